"""Model FLOPs per training step and the devices' peak rates (for MFU).

VAR FLOPs are analytic (every matmul of the forward pass counted at
2 * m * n * k, attention over the full L x L matrix since the block-causal
mask is applied to it, backward = 2x forward). The frozen tokenizer's
forward is counted from XLA's cost analysis of its (loop-free) program.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from var_jax.models.var.config import VARConfig

# Dense peak FLOP/s per device: (device_kind fragment, {dtype: peak}). float32
# on GPUs means TF32 tensor cores (XLA's default precision); TPUs run float32
# matmuls as bfloat16 passes at default precision.
_PEAKS = (
    ("H200", {"bfloat16": 989e12, "float32": 494.5e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494.5e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("TPU v6", {"bfloat16": 918e12, "float32": 918e12}),
    ("TPU v5p", {"bfloat16": 459e12, "float32": 459e12}),
    ("TPU v5", {"bfloat16": 197e12, "float32": 197e12}),  # v5e / "v5 lite"
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
)


def device_peak(device, dtype: str) -> float | None:
  """Peak FLOP/s of one device from the table; None if unknown (e.g. CPU)."""
  kind = getattr(device, "device_kind", "")
  for frag, peaks in _PEAKS:
    if frag.lower() in kind.lower():
      return peaks.get(dtype)
  return None


def var_forward_flops(cfg: VARConfig) -> float:
  """Forward FLOPs of one sequence (teacher forcing over all L tokens)."""
  c, seq, f = cfg.embed_dim, cfg.seq_len, cfg.mlp_dim
  per_token_layer = 2 * (3 * c * c + c * c + 2 * c * f) + 4 * seq * c
  per_token = (cfg.depth * per_token_layer + 2 * cfg.cvae * c
               + 2 * c * cfg.vocab_size)
  # Conditioning (AdaLN linears) runs once per sequence.
  ada = 2 * c * 6 * c * (1 if cfg.shared_aln else cfg.depth) + 2 * c * 2 * c
  return float(seq * per_token + ada)


def var_train_flops(cfg: VARConfig, batch: int) -> float:
  """Forward + backward (2x) FLOPs of one step over `batch` sequences."""
  return 3.0 * var_forward_flops(cfg) * batch


def tokenizer_flops(vae_graphdef, vae_state, resolution: int) -> float | None:
  """Forward FLOPs of tokenizing one image, from XLA's cost analysis."""
  def tokenize(st, x):
    return nnx.merge(vae_graphdef, st).img_to_idx(x)

  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          vae_state)
  img = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  try:
    cost = jax.jit(tokenize).lower(abstract, img).cost_analysis()
  except Exception:  # Cost analysis is best effort on some backends.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def measure_matmul_peak(dtype: str = "float32", n: int = 2048,
                        iters: int = 10) -> float:
  """Achieved FLOP/s of a square matmul chain on the default device."""
  dt = jnp.dtype(dtype)
  a = jax.random.normal(jax.random.key(0), (n, n), dt)

  @jax.jit
  def chain(x):
    def body(_, y):  # Keeps values bounded so every iteration is real work.
      return jnp.tanh(y @ a).astype(dt)
    return jax.lax.fori_loop(0, iters, body, x)

  chain(a).block_until_ready()
  t0 = time.perf_counter()
  chain(a).block_until_ready()
  return 2.0 * n ** 3 * iters / (time.perf_counter() - t0)
