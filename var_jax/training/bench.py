"""`var-jax bench train`: time the real training step, print one JSON line.

Reported: seconds per step and images/s (after compilation and warmup),
model FLOPs per step (VAR forward+backward, analytic, plus the tokenizer's
forward from XLA's cost analysis), achieved FLOP/s, MFU against the device
peak table ('n/a' where unknown, e.g. CPU), and the fraction of a square
matmul's FLOP/s measured in the same process on the same device.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np


def add_parser(bench_subparsers) -> None:
  """Adds `train` to a `bench` command's sub-parsers."""
  from var_jax.flags import add_batch_dtype_args, add_bench_model_args
  p = bench_subparsers.add_parser(
      "train", help="time VAR training steps (one JSON line)",
      description="Times the jitted training step of a preset on random "
                  "images and prints one JSON line.")
  add_bench_model_args(p)
  add_batch_dtype_args(p, batch=4, batch_help="global batch size",
                       dtype_help="matmul compute dtype")
  p.add_argument("--steps", type=int, default=3, help="timed steps")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed steps after compilation")
  p.add_argument("--grad-accum", type=int, default=1,
                 help="micro-batches per step (the batch is split into this "
                 "many, gradients averaged)")
  p.add_argument("--mesh", default=None, help="data=D,fsdp=F (default: all "
                 "devices on data)")
  p.add_argument("--no-matmul-peak", action="store_true",
                 help="skip measuring the matmul reference rate")
  p.set_defaults(func=run)


def _models(args):
  """(cfg, tokenizer, VAR parameters as numpy or None for a random init)."""
  from flax import nnx

  from var_jax import checkpoint
  cfg, vae, var = checkpoint.bench_models(args.ckpt, args.preset,
                                          random_var=False)
  if var is None:
    return cfg, vae, None
  return cfg, vae, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(var)))


def run(args) -> int:
  from var_jax import hardware
  from var_jax.training import flops as flops_lib
  from var_jax.training import loss as loss_lib
  from var_jax.training import mesh as mesh_lib
  from var_jax.training import optimizer as opt_lib
  from var_jax.training import sharding
  from var_jax.training import state as state_lib
  from var_jax.training import train_step as step_lib

  cfg, vae, params = _models(args)
  mesh = mesh_lib.make_mesh(args.mesh)
  mesh_lib.check_batch(mesh, args.batch, args.grad_accum)
  tx = opt_lib.make_optimizer(cfg.var)
  spec = state_lib.var_state_spec(cfg.var, tx, mesh)
  st = (state_lib.init_state(spec, cfg.var, tx, seed=0) if params is None
        else state_lib.state_from_params(spec, tx, params))
  vae_gd, vae_st, vae_sh = state_lib.vae_state(vae, mesh)
  step = step_lib.make_train_step(
      cfg, spec, vae_gd, vae_sh, tx, mesh,
      step_lib.StepOptions(dtype=args.dtype, grad_accum=args.grad_accum))
  res = cfg.vae.resolution
  rng = np.random.default_rng(0)
  local_b = args.batch // jax.process_count()
  batch = sharding.put_batch({
      "images": rng.uniform(-1, 1, (local_b, res, res, 3)).astype(np.float32),
      "labels": rng.integers(0, cfg.var.num_classes, local_b).astype(np.int32),
  }, mesh)
  inputs = step_lib.step_inputs(1e-4, 0.05,
                                loss_lib.loss_weights(cfg.var.patch_nums), 0)
  key = np.asarray(jax.random.key_data(jax.random.key(0)))

  t0 = time.perf_counter()
  st, m = step(st, vae_st, batch, *inputs, key)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    st, m = step(st, vae_st, batch, *inputs, key)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    st, m = step(st, vae_st, batch, *inputs, key)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - t0) / max(args.steps, 1)

  tok = flops_lib.tokenizer_flops(vae_gd, vae_st, res) or 0.0
  var_flops = flops_lib.var_train_flops(cfg.var, args.batch)
  total = var_flops + tok * args.batch
  achieved = total / step_s
  dev = jax.devices()[0]
  peak = hardware.device_peak(dev, args.dtype)
  out = {
      "bench": "train", "preset": cfg.name, "batch": args.batch,
      "dtype": args.dtype, "grad_accum": args.grad_accum,
      "device": f"{dev.platform}:{dev.device_kind}",
      "num_devices": jax.device_count(), "mesh": dict(mesh.shape),
      "compile_plus_first_step_s": round(compile_s, 3),
      "step_s": round(step_s, 4), "img_per_s": round(args.batch / step_s, 3),
      "var_tflop_per_step": round(var_flops / 1e12, 4),
      "tokenizer_tflop_per_step": round(tok * args.batch / 1e12, 4),
      "achieved_tflop_per_s": round(achieved / 1e12, 4),
      "mfu": "n/a" if peak is None else round(
          achieved / (peak * jax.device_count()), 4),
      "loss": float(m["loss"]),
  }
  if not args.no_matmul_peak:
    mm = hardware.measure_matmul_peak(args.dtype)
    out["matmul_tflop_per_s"] = round(mm / 1e12, 4)
    out["frac_of_matmul_peak"] = round(
        achieved / (mm * jax.device_count()), 4)
  if jax.process_index() == 0:
    print(json.dumps(out), flush=True)
  return 0
