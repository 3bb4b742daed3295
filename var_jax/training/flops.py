"""Model FLOPs per training step (the MFU of `var_jax.hardware`'s peaks).

VAR FLOPs are analytic (every matmul of the forward pass counted at
2 * m * n * k, attention over the full L x L matrix since the block-causal
mask is applied to it, backward = 2x forward). The frozen tokenizer's
forward is counted from XLA's cost analysis of its (loop-free) program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from var_jax.models.var.config import VARConfig

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


def cost_dict(cost) -> dict:
  """XLA's cost analysis as one dict (some versions give a list of them)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return cost or {}


def xla_flops(fn, *args) -> float | None:
  """FLOPs of `jax.jit(fn)` at `args` (arrays or ShapeDtypeStructs) by XLA's
  cost analysis of the lowered program on this host: exact for loop-free
  programs (a loop body is counted once). None where it gives none."""
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          args)
  try:
    cost = jax.jit(fn).lower(*abstract).cost_analysis()
  except Exception:  # Cost analysis is best effort on some backends.
    return None
  flops = cost_dict(cost).get("flops")
  return None if flops is None else float(flops)


def tokenizer_flops(vae_graphdef, vae_state, resolution: int) -> float | None:
  """Forward FLOPs of tokenizing one image, from XLA's cost analysis."""
  img = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  return xla_flops(lambda st, x: nnx.merge(vae_graphdef, st).img_to_idx(x),
                   vae_state, img)
