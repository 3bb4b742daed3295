"""Times the official PyTorch VAR (sampling or a training step) on this machine.

Prints one JSON line with the keys of `var-jax bench sample` / `bench train`,
so the two can be compared side by side:

  python tools/bench_official_torch.py --torch-repo /tmp/VAR --depth 16 \\
      --batch 8 --mode sample
  python tools/bench_official_torch.py --torch-repo /tmp/VAR --depth 16 \\
      --batch 4 --mode train
  python tools/bench_official_torch.py --torch-repo /tmp/VAR --depth 16 \\
      --batch 8 --mode side-by-side   # both samplers, same weights

Models are built with the official `build_vae_var` and random weights (the
official `init_weights` for VAR, PyTorch's default init for the VQVAE, which
`build_vae_var` leaves uninitialised). Sampling calls
`autoregressive_infer_cfg`; training calls `VARTrainer.train_step` (forward,
backward, grad clipping, fused AdamW) in float32. FLOPs are the analytic
counts shared with var_jax (`var_jax.sampling.flops`,
`var_jax.training.flops.var_train_flops`); the matmul reference rate is a
torch matmul chain measured in the same process.

Only torch, numpy and the official repository are needed at run time (plus
var_jax for the FLOP formulas). Modules the official code imports but never
uses on this path (huggingface_hub, pytz, tap) are stubbed if missing.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import importlib
import json
import os
import pathlib
import subprocess
import sys
import time
import types

import numpy as np

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _stub_missing(name, **attrs):
  try:
    importlib.import_module(name)
  except ImportError:
    sys.modules[name] = types.SimpleNamespace(**attrs)


def _import_official(repo):
  """Makes the official repository importable; stubs unused imports."""
  sys.path.insert(0, str(pathlib.Path(repo).resolve()))
  _stub_missing("huggingface_hub",
                PyTorchModelHubMixin=type("PyTorchModelHubMixin", (), {}))
  _stub_missing("pytz", timezone=lambda _: None)
  _stub_missing("tap", Tap=type("Tap", (), {}))


def _build(args):
  """(vae, var) from the official `build_vae_var`, with random weights."""
  import torch
  from torch import nn
  from models import build_vae_var
  # build_vae_var turns these reset_parameters into no-ops (for speed with
  # checkpoints); keep the originals to initialise the VQVAE afterwards.
  classes = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm,
             nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.GroupNorm)
  saved = {c: c.__dict__.get("reset_parameters") for c in classes}
  torch.manual_seed(args.seed)
  with contextlib.redirect_stdout(sys.stderr):
    vae, var = build_vae_var(
        device="cpu", depth=args.depth, shared_aln=False, attn_l2_norm=True,
        flash_if_available=False, fused_if_available=False)
  for c, fn in saved.items():
    if fn is None:
      if "reset_parameters" in c.__dict__:
        delattr(c, "reset_parameters")
    else:
      setattr(c, "reset_parameters", fn)
  with torch.no_grad():
    for m in vae.modules():
      if isinstance(m, classes):
        m.reset_parameters()
  return vae, var


def _matmul_peak(n=2048, iters=10):
  """FLOP/s of a float32 square matmul chain (as var_jax's reference rate)."""
  import torch
  a = torch.randn(n, n)
  with torch.inference_mode():
    def chain():
      y = a
      for _ in range(iters):
        y = torch.tanh(y @ a)
      return y
    chain()
    t0 = time.perf_counter()
    chain()
    return 2.0 * n ** 3 * iters / (time.perf_counter() - t0)


def _cfgs(depth):
  from var_jax.models.var.config import VQVAEConfig, var_for_depth
  vae_cfg = VQVAEConfig()  # build_vae_var's defaults: V=4096, Cvae=32, ch=160.
  return vae_cfg, var_for_depth(depth, vae=vae_cfg)


def _common(args, achieved, mm):
  import torch
  rec = {"device": "cpu:cpu", "num_devices": 1,
         "torch": torch.__version__, "threads": torch.get_num_threads()}
  rec["achieved_tflop_per_s"] = round(achieved / 1e12, 4)
  rec["mfu"] = "n/a"
  if mm is not None:
    rec["matmul_tflop_per_s"] = round(mm / 1e12, 4)
    rec["frac_of_matmul_peak"] = round(achieved / mm, 4)
  return rec


def _official_sample(var, labels, args, seed):
  """One call of the official `autoregressive_infer_cfg` (images in [0, 1])."""
  import torch
  with torch.inference_mode():
    return var.autoregressive_infer_cfg(
        B=args.batch, label_B=labels, g_seed=seed, cfg=args.cfg,
        top_k=args.top_k, top_p=args.top_p, more_smooth=False)


def bench_sample(args):
  import torch
  from var_jax.sampling import flops as sflops
  vae, var = _build(args)
  vae.eval()
  var.eval()
  labels = torch.from_numpy(np.random.default_rng(args.seed).integers(
      0, 1000, args.batch))

  once = lambda seed: _official_sample(var, labels, args, seed)

  t0 = time.perf_counter()
  for i in range(args.warmup):
    once(args.seed + i)
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for i in range(args.iters):
    img = once(args.seed + args.warmup + i)
  batch_s = (time.perf_counter() - t0) / args.iters
  if not torch.isfinite(img).all():
    raise RuntimeError("sampled images are not finite")

  vae_cfg, var_cfg = _cfgs(args.depth)
  fl = sflops.sample_flops(var_cfg, vae_cfg)
  achieved = fl["total"] * args.batch / batch_s
  rec = {"bench": "sample", "impl": "official_torch",
         "preset": f"d{args.depth}", "batch": args.batch,
         "dtype": "float32", "form": "eager", "cfg": args.cfg,
         "top_k": args.top_k, "top_p": args.top_p,
         "warmup_s": round(first_s, 3), "batch_s": round(batch_s, 4),
         "s_per_img": round(batch_s / args.batch, 4),
         "img_per_s": round(args.batch / batch_s, 4),
         "transformer_tflop_per_img": round(fl["transformer"] / 1e12, 4),
         "decoder_tflop_per_img": round(fl["decoder"] / 1e12, 4)}
  if args.time_decoder:
    f_hat = torch.randn(args.batch, var_cfg.cvae, 16, 16)
    with torch.inference_mode():
      vae.fhat_to_img(f_hat)
      t0 = time.perf_counter()
      for _ in range(args.iters):
        vae.fhat_to_img(f_hat)
    rec["decoder_s_per_img"] = round(
        (time.perf_counter() - t0) / args.iters / args.batch, 4)
  mm = None if args.no_matmul_peak else _matmul_peak()
  rec.update(_common(args, achieved, mm))
  return rec


def bench_side_by_side(args):
  """The official sampler and var-jax's, same weights, calls interleaved.

  The official random-weight models are converted with var-jax's converter
  (`convert.load.load_official`), so both draw from identical models. Calls
  alternate (official, var-jax, official, ...) with a pause between them
  (torch's OpenMP threads spin for a while after their last op), and each
  side's fastest and median call are reported: on a shared machine whose
  speed drifts, the ratio of interleaved calls is the figure that holds.
  """
  import jax
  import torch
  from var_jax.models.var.config import VQVAEConfig, var_for_depth
  from var_jax.convert.var import load
  from var_jax.convert.var.official_names import var_rules, vqvae_rules
  from var_jax.models.var.transformer import VAR
  from var_jax.models.var.vqvae import VQVAE
  from var_jax.sampling.var.sampler import SampleOptions, Sampler
  from flax import nnx

  vae_t, var_t = _build(args)
  vae_t.eval()
  var_t.eval()
  vae_cfg = VQVAEConfig()
  var_cfg = var_for_depth(args.depth, vae=vae_cfg)
  sd = lambda m: {k: v.detach().numpy() for k, v in m.state_dict().items()}
  vae = VQVAE(vae_cfg, rngs=nnx.Rngs(0))
  load.load_official(vae, vqvae_rules(vae_cfg), sd(vae_t), "VQVAE")
  var = VAR(var_cfg, rngs=nnx.Rngs(0))
  load.load_official(var, var_rules(var_cfg), sd(var_t), "VAR",
                     var_cfg.patch_nums)
  plan = None
  if args.tuning == "stored":
    from var_jax.sampling.jobs import stored_tuning
    plan, _ = stored_tuning(vae, var, args.dtype, args.batch)
  sampler = Sampler(vae, var, SampleOptions(
      cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, dtype=args.dtype,
      scale_loop=args.scale_loop, layer_loop=args.layer_loop), tuning=plan)
  del var
  labels = np.random.default_rng(args.seed).integers(0, 1000, args.batch)
  ids = np.arange(args.batch, dtype=np.int32)
  t0 = time.perf_counter()
  run = sampler.compile(args.batch)
  compile_s = time.perf_counter() - t0
  labels_t = torch.from_numpy(labels)
  official = lambda seed: _official_sample(var_t, labels_t, args, seed)

  def ours(seed):
    return jax.block_until_ready(run(labels.astype(np.int32), seed, ids))

  times = {"official": [], "var_jax": []}
  for i in range(args.warmup + args.iters):
    for name, fn in (("official", official), ("var_jax", ours)):
      time.sleep(1.0)
      t0 = time.perf_counter()
      fn(args.seed + i)
      if i >= args.warmup:
        times[name].append(time.perf_counter() - t0)
  per_img = {k: sorted(v) for k, v in times.items()}
  best = {k: v[0] / args.batch for k, v in per_img.items()}
  median = {k: v[len(v) // 2] / args.batch for k, v in per_img.items()}
  return {"bench": "sample_side_by_side", "preset": f"d{args.depth}",
          "batch": args.batch, "dtype_var_jax": args.dtype,
          "dtype_official": "float32", "cfg": args.cfg, "top_k": args.top_k,
          "top_p": args.top_p, "calls_each": args.iters,
          "official_s_per_img_min": round(best["official"], 4),
          "var_jax_s_per_img_min": round(best["var_jax"], 4),
          "official_s_per_img_median": round(median["official"], 4),
          "var_jax_s_per_img_median": round(median["var_jax"], 4),
          "speedup_min": round(best["official"] / best["var_jax"], 3),
          "speedup_median": round(median["official"] / median["var_jax"], 3),
          "var_jax_compile_s": round(compile_s, 2),
          "scale_loop": args.scale_loop, "layer_loop": args.layer_loop,
          "cpu_tuning": None if plan is None else plan.describe(),
          "torch": torch.__version__,
          "threads": torch.get_num_threads()}


class _NoLog:
  """Stands in for the official MetricLogger / TensorboardLogger."""
  log_iters = ()

  def update(self, *a, **k):
    pass


def bench_train(args):
  import torch
  # The official utils/arg_util.py runs `git symbolic-ref` at import time.
  if subprocess.run(["git", "rev-parse", "HEAD"],  # cwd: the repo
                    capture_output=True).returncode:
    sys.exit(f"error: --torch-repo {args.torch_repo} must be a git checkout "
             "(`git clone`): the official trainer asks git for its branch")
  from trainer import VARTrainer
  from utils.amp_sc import AmpOptimizer
  from utils.lr_control import filter_params
  from var_jax.sampling import flops as sflops
  from var_jax.training import flops as tflops

  vae, var = _build(args)
  var.train()
  pn = var.patch_nums
  nowd = {"cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed",
          "pos_1LC", "pos_start", "start_pos", "lvl_embed", "gamma", "beta",
          "ada_gss", "moe_bias", "scale_mul"}  # train.py's no-decay keys
  # filter_params prints with force=True, a keyword the official distributed
  # setup adds to print (not run here).
  plain_print = builtins.print
  builtins.print = lambda *a, force=False, **k: plain_print(*a, **k)
  try:
    with contextlib.redirect_stdout(sys.stderr):
      names, paras, groups = filter_params(var, nowd_keys=nowd)
  finally:
    builtins.print = plain_print
  lr = 1e-4 * args.batch / 256  # train.py: tlr = tblr * batch / 256
  for g in groups:  # What train.py's lr_wd_annealing sets each step.
    g["lr"], g["weight_decay"] = lr * g["lr_sc"], 0.05 * g["wd_sc"]
  try:
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0, betas=(0.9, 0.95),
                            fused=True)
  except (RuntimeError, TypeError):  # No fused CPU AdamW in this build.
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0, betas=(0.9, 0.95))
  var_opt = AmpOptimizer(mixed_precision=0, optimizer=opt, names=names,
                         paras=paras, grad_clip=2.0)
  trainer = VARTrainer(device="cpu", patch_nums=pn,
                       resos=tuple(p * 16 for p in pn), vae_local=vae,
                       var_wo_ddp=var, var=var, var_opt=var_opt,
                       label_smooth=0.0)
  rng = np.random.default_rng(args.seed)
  res = pn[-1] * 16
  img = torch.from_numpy(rng.uniform(-1, 1, (args.batch, 3, res, res))
                         .astype(np.float32))
  labels = torch.from_numpy(rng.integers(0, 1000, args.batch))
  log = _NoLog()

  def step(i):
    # it, g_it >= 1 and not one of the logged iterations: no logging work.
    trainer.train_step(it=i + 1, g_it=i + 1, stepping=True, metric_lg=log,
                       tb_lg=log, inp_B3HW=img, label_B=labels, prog_si=-1,
                       prog_wp_it=1.0)

  t0 = time.perf_counter()
  step(0)
  first_s = time.perf_counter() - t0
  for i in range(args.warmup):
    step(1 + i)
  t0 = time.perf_counter()
  for i in range(args.iters):
    step(1 + args.warmup + i)
  step_s = (time.perf_counter() - t0) / args.iters

  vae_cfg, var_cfg = _cfgs(args.depth)
  var_fl = tflops.var_train_flops(var_cfg, args.batch)
  tok_fl = sflops.tokenizer_flops(vae_cfg) * args.batch
  achieved = (var_fl + tok_fl) / step_s
  rec = {"bench": "train", "impl": "official_torch",
         "preset": f"d{args.depth}", "batch": args.batch, "dtype": "float32",
         "grad_accum": 1, "fused_adamw": bool(opt.defaults.get("fused")),
         "first_step_s": round(first_s, 3), "step_s": round(step_s, 4),
         "img_per_s": round(args.batch / step_s, 3),
         "var_tflop_per_step": round(var_fl / 1e12, 4),
         "tokenizer_tflop_per_step": round(tok_fl / 1e12, 4)}
  mm = None if args.no_matmul_peak else _matmul_peak()
  rec.update(_common(args, achieved, mm))
  return rec


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--torch-repo", required=True,
                 help="checkout of FoundationVision/VAR")
  p.add_argument("--depth", type=int, default=16)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--mode", choices=("sample", "train", "side-by-side"),
                 default="sample",
                 help="side-by-side: the official and the var-jax sampler, "
                      "same weights, calls interleaved in one process")
  p.add_argument("--dtype", choices=("float32", "bfloat16"),
                 default="float32",
                 help="side-by-side: var-jax's compute dtype (the official "
                      "sampler runs float32)")
  p.add_argument("--scale-loop", choices=("python", "scan"),
                 default="python", help="side-by-side: var-jax's scale loop")
  p.add_argument("--layer-loop", choices=("unrolled", "scan"),
                 default="unrolled", help="side-by-side: var-jax's layer loop")
  p.add_argument("--tuning", choices=("stored", "none"), default="stored",
                 help="side-by-side: the CPU tuning `var-jax tune` stored "
                      "for this model (XLA's defaults if none), or none")
  p.add_argument("--cfg", type=float, default=1.5)
  p.add_argument("--top-k", type=int, default=900)
  p.add_argument("--top-p", type=float, default=0.96)
  p.add_argument("--iters", type=int, default=2, help="timed calls / steps")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls first")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=None,
                 help="torch intra-op threads (default: torch's choice)")
  p.add_argument("--time-decoder", action="store_true",
                 help="sample mode: also time the VQVAE decoder alone")
  p.add_argument("--no-matmul-peak", action="store_true")
  args = p.parse_args(argv)
  sys.path.insert(0, str(_ROOT))  # var_jax, for the shared FLOP formulas.
  import torch
  if args.threads:
    torch.set_num_threads(args.threads)
  _import_official(args.torch_repo)
  os.chdir(args.torch_repo)  # Relative paths in the official code, if any.
  rec = {"sample": bench_sample, "train": bench_train,
         "side-by-side": bench_side_by_side}[args.mode](args)
  print(json.dumps(rec), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
