"""`var-jax bench sample`: time class-conditional sampling, print one JSON line.

Reported: the stored CPU tuning used (`cpu_tuning`: compiler options of the
two programs, decoder form; see `var-jax tune`), AOT compile seconds,
seconds per batch and per image and images/s (after compilation and warmup),
the analytic FLOPs per image (transformer with CFG + VQVAE decoder,
`var_jax.sampling.flops`), the achieved FLOP/s, MFU against the device peak
table ('n/a' where unknown, e.g. CPU) and the
fraction of a square matmul's FLOP/s measured in the same process.
`tools/bench_official_torch.py` prints the same keys for the official code.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np


def add_parser(bench_subparsers) -> None:
  """Adds `sample` to a `bench` command's sub-parsers."""
  from var_jax.flags import add_batch_dtype_args, add_bench_model_args
  p = bench_subparsers.add_parser(
      "sample", help="time class-conditional sampling (one JSON line)",
      description="Times the jitted sampler (KV cache, CFG, top-k/top-p, "
                  "VQVAE decoder) of a preset and prints one JSON line.")
  add_bench_model_args(p)
  add_batch_dtype_args(p, batch=8, batch_help="images per call",
                       dtype_help="transformer compute dtype")
  from var_jax.sampling.var.options import LAYER_LOOPS, SCALE_LOOPS
  p.add_argument("--scale-loop", choices=SCALE_LOOPS, default="python",
                 help="how the program steps over the scales (default "
                      "python)")
  p.add_argument("--layer-loop", choices=LAYER_LOOPS, default="unrolled",
                 help="how the blocks run (default unrolled)")
  p.add_argument("--refiner-preset", metavar="PRESET",
                 help="collaborative decoding: --preset is the drafter, this "
                      "preset (random weights, same tokenizer) the refiner")
  p.add_argument("--draft-steps", type=int, metavar="N",
                 help="scales the drafter draws (with --refiner-preset)")
  p.add_argument("--cfg-until", type=int, metavar="SCALE",
                 help="drop guidance from this scale index on")
  p.add_argument("--cfg", type=float, default=1.5, help="guidance scale")
  p.add_argument("--top-k", type=int, default=900,
                 help="keep the k most likely tokens, 0 = all")
  p.add_argument("--top-p", type=float, default=0.96,
                 help="nucleus mass in [0, 1], 0 = off")
  p.add_argument("--iters", type=int, default=2, help="timed calls")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed calls after compilation")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the random labels and of the first call")
  p.add_argument("--time-decoder", action="store_true",
                 help="also time the VQVAE decoder alone on the batch")
  p.add_argument("--no-matmul-peak", action="store_true",
                 help="skip measuring the matmul reference rate")
  p.set_defaults(func=run)


def _time_decoder(run, vae_state, var_cfg, batch, iters):
  """Seconds per call of the sampler's compiled decoder alone."""
  side = var_cfg.patch_nums[-1]
  f = jax.random.normal(jax.random.key(0), (batch, side, side, var_cfg.cvae))
  run.decoder(vae_state, f).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(iters):
    run.decoder(vae_state, f).block_until_ready()
  return (time.perf_counter() - t0) / iters


def _memory(compiled) -> dict:
  """Bytes of the compiled program (XLA's memory analysis), where known."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not on every backend)
    return {}
  if m is None:
    return {}
  out = {}
  for key, attr in (("temp_bytes", "temp_size_in_bytes"),
                    ("argument_bytes", "argument_size_in_bytes"),
                    ("output_bytes", "output_size_in_bytes"),
                    ("peak_bytes", "peak_memory_in_bytes")):
    v = getattr(m, attr, None)
    if v is not None and v >= 0:
      out[key] = int(v)
  return out


def _models(args):
  """(ModelConfig, VQVAE, VAR, drafter or None); checked before building."""
  from var_jax import checkpoint
  from var_jax.models.var.config import get_preset
  from var_jax.errors import CheckpointError, UserError
  if (args.refiner_preset is None) != (args.draft_steps is None):
    raise UserError("--refiner-preset and --draft-steps go together")
  if args.refiner_preset is None:
    model_config, vae, var = checkpoint.bench_models(args.ckpt, args.preset)
    return model_config, vae, var, None
  try:
    ref_cfg = get_preset(args.refiner_preset)
    drafter_cfg = (checkpoint.load_config(args.ckpt) if args.ckpt else
                   get_preset(args.preset))
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  if ref_cfg.var is None or ref_cfg.vae != drafter_cfg.vae:
    raise UserError(f"--refiner-preset {args.refiner_preset} does not share "
                    f"the tokenizer of the drafter ({drafter_cfg.name})")
  model_config, vae, drafter = checkpoint.bench_models(args.ckpt, args.preset)
  from flax import nnx
  from var_jax.models.var.transformer import VAR
  return model_config, vae, VAR(ref_cfg.var, rngs=nnx.Rngs(2)), drafter


def run(args) -> int:
  from var_jax.sampling import flops as sflops
  from var_jax.sampling.jobs import stored_tuning
  from var_jax.sampling.var.sampler import SampleOptions, Sampler
  from var_jax import hardware

  if args.batch < 1 or args.iters < 1:
    from var_jax.errors import UserError
    raise UserError("--batch and --iters must be >= 1")
  opts = SampleOptions(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                       dtype=args.dtype, scale_loop=args.scale_loop,
                       layer_loop=args.layer_loop,
                       cfg_until=args.cfg_until, draft_steps=args.draft_steps)
  model_config, vae, var, drafter = _models(args)
  widest = var if drafter is None else max(
      (var, drafter), key=lambda m: m.cfg.embed_dim)
  plan, _ = stored_tuning(vae, widest, args.dtype, args.batch)
  sampler = Sampler(vae, var, opts, drafter=drafter, tuning=plan)
  var_cfg, drafter_cfg = var.cfg, None if drafter is None else drafter.cfg
  del var, drafter  # The sampler holds what it needs (halves peak memory).
  labels = np.random.default_rng(args.seed).integers(
      0, var_cfg.num_classes, args.batch).astype(np.int32)
  ids = np.arange(args.batch, dtype=np.int32)

  t0 = time.perf_counter()
  fn = sampler.compile(args.batch)
  compile_s = time.perf_counter() - t0
  for i in range(args.warmup):
    jax.block_until_ready(fn(labels, args.seed + i, ids))
  t0 = time.perf_counter()
  for i in range(args.iters):
    out = fn(labels, args.seed + args.warmup + i, ids)
    jax.block_until_ready(out)
  batch_s = (time.perf_counter() - t0) / args.iters
  if not np.isfinite(np.asarray(out[1])).all():
    raise RuntimeError("sampled images are not finite")

  resolved = sampler.opts.resolved(len(var_cfg.patch_nums))
  fl = sflops.sample_flops(var_cfg, vae.cfg, drafter=drafter_cfg,
                           draft_steps=args.draft_steps,
                           cfg_until=resolved.cfg_until)
  achieved = fl["total"] * args.batch / batch_s
  dev = jax.devices()[0]
  peak = hardware.device_peak(dev, args.dtype)
  rec = {
      "bench": "sample", "impl": "var_jax", "preset": model_config.name,
      "refiner_preset": args.refiner_preset, "draft_steps": args.draft_steps,
      "cfg_until": args.cfg_until,
      "batch": args.batch, "dtype": args.dtype, "scale_loop": opts.scale_loop,
      "layer_loop": opts.layer_loop,
      "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p,
      "device": f"{dev.platform}:{dev.device_kind}",
      "num_devices": jax.device_count(),
      "compile_s": round(compile_s, 3), "batch_s": round(batch_s, 4),
      "s_per_img": round(batch_s / args.batch, 4),
      "img_per_s": round(args.batch / batch_s, 4),
      "transformer_tflop_per_img": round(fl["transformer"] / 1e12, 4),
      "decoder_tflop_per_img": round(fl["decoder"] / 1e12, 4),
      "achieved_tflop_per_s": round(achieved / 1e12, 4),
      "mfu": "n/a" if peak is None else round(achieved / peak, 4),
  }
  rec.update(_memory(fn.compiled))
  rec["decoder_temp_bytes"] = _memory(fn.decoder).get("temp_bytes")
  rec["cpu_tuning"] = None if plan is None else plan.describe()
  if args.time_decoder:
    dec_s = _time_decoder(fn, sampler.vae_state, var_cfg, args.batch,
                          args.iters)
    rec["decoder_s_per_img"] = round(dec_s / args.batch, 4)
  if not args.no_matmul_peak:
    mm = hardware.measure_matmul_peak(args.dtype)
    rec["matmul_tflop_per_s"] = round(mm / 1e12, 4)
    rec["frac_of_matmul_peak"] = round(achieved / mm, 4)
  print(json.dumps(rec), flush=True)
  return 0
