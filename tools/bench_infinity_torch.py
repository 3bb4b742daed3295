"""Side-by-side speed of the official Infinity sampler (PyTorch, CPU) and
var-jax's, same random weights, calls interleaved in one process.

  python tools/bench_infinity_torch.py --official /tmp/Infinity --batch 1
  python tools/bench_infinity_torch.py --official /tmp/Infinity --batch 4 \\
      --calls 4
  python tools/bench_infinity_torch.py --official /tmp/Infinity --depth 2 \\
      --width 256 --heads 2 --text-channels 256 --vae-base-ch 32 \\
      --vae-res-blocks 1     # a small shape, to try the tool

The default shape is Infinity-2B's (depth 32, width 2048, 16 heads, T5
width 2048) with its tokenizer's (infinity_vae_d32reg: 32 bits, patch 16,
base width 128, ch_mult (1, 2, 4, 4, 4), 2 residual blocks), the 256px 1:1
schedule, cfg 3 on the logits, tau 0.5, top-k 900, top-p 0.97, float32.
With `--dtype bfloat16` the official blocks are cast to bfloat16 and the
call runs under `torch.autocast("cpu", dtype=torch.bfloat16)`, as
tools/run_infinity.py does on CUDA (the blocks' LayerNorms stay float32,
as CUDA autocast computes them); ours is `InfinityOptions(dtype=
"bfloat16")` (what `var-jax t2i --dtype bfloat16` runs).

The official models are built through their constructors
(tools/official_infinity.py: flash-attn replaced by exact attention, the
fused norms eager) with random weights; their state dicts are converted with
var-jax's converters (`var_jax.convert.infinity.infinity` and `.bsq`), so
both samplers run identical weights. Prompts are random T5-like states (one
length per prompt, at most `--text-len`): packed for the official sampler,
padded (to the length `var-jax t2i` pads to) with a mask for ours.

Calls alternate (official, ours, official, ours, ...) with a pause between
them; the first call of each is a warm-up (ours includes compilation) and
is reported apart. Per part: the official decode is the time inside its
`vae.decode` call, the rest being the transformer loop; ours is timed whole,
then `vae.decode` again alone (jitted) on the summed codes it returned, and
the transformer loop is the difference.

Memory: both models are held at once (each sampler needs its own), about
2 x 9.2 GB in float32 at the 2B shape, plus both KV caches (about 2.2 GB
each at batch 4 with guidance). The conversion goes one tensor at a time
and frees the intermediate arrays, so it adds little to that; the JSON line
reports the process's peak resident memory after each stage.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import sys
import time

import numpy as np

_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "tools"))
import official_infinity as oi  # noqa: E402

SIZES = {"0.06M": 256, "0.25M": 512, "1M": 1024}


def _peak_gb() -> float:
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)


def _prompts(args):
  """(states per prompt, lengths): random normal T5-like states."""
  rng = np.random.default_rng(args.seed)
  lens = rng.integers(max(1, args.text_len // 2), args.text_len + 1,
                      args.batch)
  states = [rng.standard_normal((int(n), args.text_channels))
            .astype(np.float32) for n in lens]
  return states, [int(n) for n in lens]


def _padded(states, lens, text_maxlen):
  from var_jax.sampling.infinity.jobs import text_length
  t = text_length(max(lens), text_maxlen)
  text = np.zeros((len(states), t, states[0].shape[1]), np.float32)
  for i, s in enumerate(states):
    text[i, :len(s)] = s
  mask = (np.arange(t)[None] < np.asarray(lens)[:, None]).astype(np.int32)
  return text, mask


def _to_jax(tree):
  """Replaces the NumPy leaves of a nested dict by JAX arrays, one at a
  time, so each NumPy copy can be freed as soon as it is converted."""
  import jax.numpy as jnp
  for k in list(tree):
    if isinstance(tree[k], dict):
      _to_jax(tree[k])
    else:
      tree[k] = jnp.asarray(tree[k])
  return tree


def _ours(vae_t, model_t):
  """var-jax's (transformer, tokenizer) from the official modules."""
  from flax import nnx
  from var_jax.convert.infinity import bsq as bsq_convert
  from var_jax.convert.infinity import infinity as inf_convert
  from var_jax.models.abstract import abstract_split
  from var_jax.models.infinity.bsq import BSQVAE
  from var_jax.models.infinity.transformer import Infinity

  def merge(ctor, cfg, params):
    graphdef, state = abstract_split(ctor, cfg)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)

  sd = bsq_convert.state_dict_of(
      {k: v.detach().numpy() for k, v in vae_t.state_dict().items()},
      "the official tokenizer")
  cfg = bsq_convert.infer_config(sd)
  vae = merge(BSQVAE, cfg, _to_jax(bsq_convert.bsq_params(cfg, sd)))
  sd = {k: v.detach().numpy() for k, v in model_t.state_dict().items()}
  cfg = inf_convert.infer_config(sd)
  params = inf_convert.infinity_params(cfg, sd)
  del sd
  model = merge(Infinity, cfg, _to_jax(params))
  return model, vae


def _summary(times, batch):
  if not times:
    return {}
  med = statistics.median(times)
  return {"median_s": round(med, 4), "min_s": round(min(times), 4),
          "mean_s": round(statistics.fmean(times), 4),
          "img_per_s": round(batch / med, 4)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--official", required=True,
                 help="checkout of FoundationVision/Infinity")
  p.add_argument("--batch", type=int, default=1, help="prompts per call")
  p.add_argument("--calls", type=int, default=3,
                 help="calls of each sampler, interleaved; the first of each "
                      "is a warm-up")
  p.add_argument("--depth", type=int, default=32)
  p.add_argument("--width", type=int, default=2048)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--text-channels", type=int, default=2048)
  p.add_argument("--text-len", type=int, default=32,
                 help="longest prompt (lengths drawn in [n/2, n])")
  p.add_argument("--codebook-dim", type=int, default=32)
  p.add_argument("--vae-base-ch", type=int, default=128)
  p.add_argument("--vae-ch-mult", default="1,2,4,4,4")
  p.add_argument("--vae-res-blocks", type=int, default=2)
  p.add_argument("--pn", choices=sorted(SIZES), default="0.06M",
                 help="the official schedule name (0.06M: 256px), 1:1")
  p.add_argument("--cfg", type=float, default=3.0)
  p.add_argument("--tau", type=float, default=0.5)
  p.add_argument("--top-k", type=int, default=900)
  p.add_argument("--top-p", type=float, default=0.97)
  p.add_argument("--cfg-insertion-layer", type=int, default=0,
                 help="0: guidance on the logits; -n: on the hidden states "
                      "after block depth - n")
  p.add_argument("--dtype", choices=("float32", "bfloat16"),
                 default="float32")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=None,
                 help="torch intra-op threads (default: torch's choice)")
  p.add_argument("--pause", type=float, default=1.0,
                 help="seconds between calls (torch's threads spin a while "
                      "after their last op)")
  args = p.parse_args(argv)
  if args.calls < 1 or args.batch < 1:
    p.error("--calls and --batch must be at least 1")
  args.vae_ch_mult = tuple(int(x) for x in args.vae_ch_mult.split(","))
  sys.path.insert(0, str(_ROOT))  # var_jax of this checkout.

  import torch
  if args.threads:
    torch.set_num_threads(args.threads)
  import jax
  from flax import nnx
  from var_jax.models.infinity import schedules
  from var_jax.sampling.infinity.sampler import (InfinityOptions,
                                                 InfinitySampler)

  mem = {}
  oi.import_official(args.official)
  t0 = time.perf_counter()
  vae_t = oi.build_vae(args.codebook_dim, base_ch=args.vae_base_ch,
                       num_res_blocks=args.vae_res_blocks,
                       ch_mult=args.vae_ch_mult, seed=args.seed)
  model_t = oi.build_infinity(
      vae_t, depth=args.depth, embed_dim=args.width, num_heads=args.heads,
      text_channels=args.text_channels, pn=args.pn, seed=args.seed)
  build_s = time.perf_counter() - t0
  mem["after_official_build"] = _peak_gb()
  t0 = time.perf_counter()
  model, vae = _ours(vae_t, model_t)
  convert_s = time.perf_counter() - t0
  mem["after_conversion"] = _peak_gb()
  n_params = sum(q.numel() for q in model_t.parameters())
  amp = None
  if args.dtype == "bfloat16":
    for block in model_t.unregistered_blocks:
      block.bfloat16()
      # CUDA autocast runs layer_norm in float32 with its weights cast up;
      # CPU autocast refuses bfloat16 weights on a float32 input instead.
      for m in block.modules():
        if isinstance(m, torch.nn.LayerNorm):
          m.float()
    amp = torch.bfloat16

  opts = InfinityOptions(cfg=args.cfg, tau=args.tau, top_k=args.top_k,
                         top_p=args.top_p,
                         cfg_insertion_layer=args.cfg_insertion_layer,
                         dtype=args.dtype)
  sampler = InfinitySampler(model, vae, opts)
  vae_graph, vae_state = nnx.split(vae)
  decode = jax.jit(lambda s, z: nnx.merge(vae_graph, s).decode(z))
  grids = schedules.schedule(1.0, SIZES[args.pn])

  states, lens = _prompts(args)
  text_t = oi.pack_text(states)
  text, mask = _padded(states, lens, model.cfg.text_maxlen)
  del model

  def official(seed):
    out = oi.sample(model_t, vae_t, text_t, cfg=args.cfg, tau=args.tau,
                    top_k=args.top_k, top_p=args.top_p,
                    cfg_insertion_layer=args.cfg_insertion_layer, seed=seed,
                    pn=args.pn, autocast_dtype=amp)
    if not torch.isfinite(out["image"]).all():
      raise RuntimeError("the official images are not finite")
    return out["total_s"], out["decode_s"]

  def ours(seed):
    t0 = time.perf_counter()
    out = jax.block_until_ready(sampler(text, mask, seed=seed, grids=grids))
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(decode(vae_state, out.summed_BHWC))
    dec = time.perf_counter() - t0
    if not np.isfinite(np.asarray(out.images_BHWC)).all():
      raise RuntimeError("var-jax's images are not finite")
    return total, dec

  runs = {"official": [], "var_jax": []}
  for i in range(args.calls):
    for name, fn in (("official", official), ("var_jax", ours)):
      time.sleep(args.pause)
      runs[name].append(fn(args.seed + i))
  mem["end"] = _peak_gb()

  rec = {"bench": "infinity_sample_side_by_side", "batch": args.batch,
         "dtype": args.dtype, "depth": args.depth, "width": args.width,
         "heads": args.heads, "text_channels": args.text_channels,
         "params": n_params, "codebook_dim": args.codebook_dim,
         "vae_base_ch": args.vae_base_ch, "vae_ch_mult": args.vae_ch_mult,
         "vae_res_blocks": args.vae_res_blocks, "pn": args.pn,
         "image_size": SIZES[args.pn], "lens": lens,
         "padded_text_len": int(text.shape[1]), "cfg": args.cfg,
         "tau": args.tau, "top_k": args.top_k, "top_p": args.top_p,
         "cfg_insertion_layer": args.cfg_insertion_layer,
         "calls_each": args.calls, "timed_calls_each": args.calls - 1}
  for name, calls in runs.items():
    (first, first_dec), timed = calls[0], calls[1:]
    part = {"first_call_s": round(first, 3),
            "first_call_decode_s": round(first_dec, 3)}
    part.update(_summary([t for t, _ in timed], args.batch))
    if timed:
      dec = statistics.median(d for _, d in timed)
      part["decode_median_s"] = round(dec, 4)
      part["transformer_median_s"] = round(
          statistics.median(t - d for t, d in timed), 4)
    rec[name] = part
  if args.calls > 1:
    rec["img_per_s_ratio_var_jax_over_official"] = round(
        rec["var_jax"]["img_per_s"] / rec["official"]["img_per_s"], 3)
  rec.update({"official_build_s": round(build_s, 2),
              "conversion_s": round(convert_s, 2),
              "peak_rss_gb": mem, "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(),
              "jax": jax.__version__,
              "jax_device": str(jax.devices()[0].platform),
              "official_attention": "exact float32 per sequence "
                                    "(flash-attn stand-in)",
              "official_fused_norm": "eager (torch.compile off)"})
  print(json.dumps(rec), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
