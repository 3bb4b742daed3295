"""`var-jax bench eval`: images/s of Inception feature extraction.

Times the jitted, sharded extractor (resize to 299, InceptionV3, the three
ADM features) on random uint8 images, after compilation and warmup, and
prints one JSON line. `--official` times torch-fidelity's
`FeatureExtractorInceptionV3` in the same process on the same images with the
same weights (needs torch and torch-fidelity installed) and adds its figure,
the ratio, and the largest difference between the two networks' `pool_3`
and unbiased logits (relative to their max magnitude).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np


def add_parser(bench_subparsers) -> None:
  p = bench_subparsers.add_parser(
      "eval", help="time Inception feature extraction (one JSON line)",
      description="Times `var-jax eval`'s feature extraction (images/s) and, "
                  "with --official, torch-fidelity's on the same CPU.")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--inception", help="weights .pth (torch-fidelity's)")
  src.add_argument("--random-init", action="store_true",
                   help="random weights (the golden seed recipe, seed 0)")
  p.add_argument("--batch", type=int, default=64, help="images per step")
  p.add_argument("--size", type=int, default=256,
                 help="input side before the resize to 299 (default 256)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype of the Inception network's convolutions")
  p.add_argument("--iters", type=int, default=2, help="timed batches")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed batches after compilation")
  p.add_argument("--chunk", type=int, default=None,
                 help="images per device step (default: the extractor's)")
  p.add_argument("--official", action="store_true",
                 help="also time torch-fidelity's extractor (torch CPU)")
  p.add_argument("--torch-threads", type=int, default=None,
                 help="torch.set_num_threads for --official (default: "
                      "torch's own)")
  p.set_defaults(func=run)


def _time_calls(fn, iters: int) -> float:
  t0 = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - t0) / iters


def _import_fidelity_inception():
  """torch-fidelity's `FeatureExtractorInceptionV3` class.

  The package's `__init__` imports every extractor, and the CLIP one needs
  torchvision; when that import fails, the Inception module is imported on
  its own (it needs only torch).
  """
  import importlib.util
  import sys
  import types
  try:
    from torch_fidelity.feature_extractor_inceptionv3 import (
        FeatureExtractorInceptionV3)
    return FeatureExtractorInceptionV3
  except ImportError:
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
      raise
    for name in [m for m in sys.modules if m.startswith("torch_fidelity")]:
      del sys.modules[name]
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = pkg
    from torch_fidelity.feature_extractor_inceptionv3 import (
        FeatureExtractorInceptionV3)
    return FeatureExtractorInceptionV3


def import_official():
  """(torch, torch-fidelity's extractor class), or a one-line UserError with
  the install command.

  torch-fidelity is installed without its dependencies: it would pull in
  torchvision, which only its CLIP extractor needs.
  """
  try:
    import torch
    return torch, _import_fidelity_inception()
  except ImportError as e:
    from var_jax.errors import UserError
    raise UserError(f"--official needs torch and torch-fidelity ({e}): "
                    "pip install torch && pip install --no-deps "
                    "torch-fidelity") from None


def _official(sd, images_BHWC, iters, warmup, threads):
  """(seconds per batch, threads, torch version, {feature: output}) of
  torch-fidelity's extractor on the same weights and images."""
  torch, FeatureExtractorInceptionV3 = import_official()
  if threads:
    torch.set_num_threads(threads)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "inception.pth")
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)
    net = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"],
        feature_extractor_weights_path=path)
  x = torch.from_numpy(np.ascontiguousarray(images_BHWC.transpose(0, 3, 1, 2)))

  def call():
    with torch.no_grad():
      return net(x)

  for _ in range(warmup):
    call()
  pool, logits = call()
  outputs = {"pool": pool.numpy(), "logits_unbiased": logits.numpy()}
  return (_time_calls(call, iters), torch.get_num_threads(), torch.__version__,
          outputs)


def run(args) -> int:
  import jax
  import jax.numpy as jnp

  from var_jax.convert import inception as ci
  from var_jax.errors import UserError
  from var_jax.eval.features import ADM_FEATURES, FeatureExtractor
  if args.batch < 1 or args.iters < 1 or args.size < 1:
    raise UserError("--batch, --iters and --size must be >= 1")
  if args.official:
    import_official()  # Before the timings: a missing package is one line.
  if args.random_init:
    sd = ci.random_state_dict(0)
  else:
    sd = ci.read_inception_state_dict(args.inception)
  model = ci.convert_state_dict(sd, where=args.inception or "random weights",
                                dtype=jnp.dtype(args.dtype))
  ext = FeatureExtractor(model, batch=args.batch, names=ADM_FEATURES,
                         chunk=args.chunk)
  images = np.random.default_rng(0).integers(
      0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
  t0 = time.perf_counter()
  ours = jax.device_get(ext.step(images))
  compile_s = time.perf_counter() - t0

  def call():
    jax.block_until_ready(ext.step(images))

  for _ in range(args.warmup):
    call()
  per_batch = _time_calls(call, args.iters)
  out = {
      "bench": "eval", "batch": args.batch, "size": args.size,
      "dtype": args.dtype, "chunk": ext.chunk,
      "devices": jax.local_device_count(),
      "platform": jax.devices()[0].platform,
      "compile_s": round(compile_s, 2),
      "s_per_batch": round(per_batch, 4),
      "images_per_s": round(args.batch / per_batch, 2),
  }
  if args.official:
    t, threads, version, theirs = _official(sd, images, args.iters,
                                            args.warmup, args.torch_threads)
    err = {k: float(np.max(np.abs(ours[k] - v)) / np.max(np.abs(v)))
           for k, v in theirs.items()}
    out.update({
        "max_rel_err_vs_official": {k: float(f"{e:.3g}") for k, e in
                                    err.items()},
        "official_s_per_batch": round(t, 4),
        "official_images_per_s": round(args.batch / t, 2),
        "official_torch_threads": threads, "torch": version,
        "speedup_vs_official": round(t / per_batch, 3),
    })
  print(json.dumps(out), flush=True)
  return 0
