"""Block-causal attention for teacher forcing, with a memory-light gradient.

A token attends to its own scale and every coarser one, so the (L, L) score
matrix is block lower-triangular: at 256px, 37% of it is masked out. The
rows are cut into segments along scale boundaries; a segment attends only to
the key prefix it can see, and a segment of one scale needs no mask at all.

The gradient is written by hand (the flash-attention recipe): the forward
keeps only the output and the row log-sum-exp, and the backward recomputes
the probabilities segment by segment. Autodiff of a plain softmax would keep
every layer's (B, H, L, L) probabilities for the backward pass (1.9 GB per
step for d16 at batch 4) and stream them through memory several times.

On the CPU, the (row, head) pairs of a segment are processed in groups whose
score tiles fit in a few MiB, so the softmax and its gradient run in cache;
on accelerators every segment is one fused batch (`tiled`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models import scales

# Largest score tile (bytes) one step of the grouped loops materialises.
TILE_BYTES = 4 << 20
# Consecutive scales are merged into one segment until it has this many rows
# (tiny scales alone would make tiny matmuls).
_MIN_SEGMENT_ROWS = 64
NEG = -1e30  # Finite "-inf" for masks: keeps fully masked rows NaN-free.


def group_size(n: int, rows: int, keys: int) -> int:
  """Largest divisor g of n with a (g, rows, keys) float32 tile in budget."""
  fits = [d for d in range(1, n + 1)
          if n % d == 0 and d * rows * keys * 4 <= TILE_BYTES]
  return max(fits or [1])


def segments(patch_nums) -> tuple[tuple[int, int, int], ...]:
  """(row_begin, row_end, first_scale) of each segment, in order."""
  ends = scales.layout(tuple(patch_nums)).ends
  out, begin, first = [], 0, 0
  for i, row in enumerate(ends):
    if row - begin >= _MIN_SEGMENT_ROWS or i == len(ends) - 1:
      out.append((begin, row, first))
      begin, first = row, i + 1
  return tuple(out)


def block_causal_bias(patch_nums) -> np.ndarray:
  """(L, L) additive mask: a token sees its own scale and all coarser ones."""
  lvl = scales.layout(tuple(patch_nums)).level_ids()
  return np.where(lvl[:, None] >= lvl[None, :], 0.0, NEG).astype(np.float32)


def _segment_bias(patch_nums, begin: int, end: int) -> np.ndarray | None:
  """(rows, keys) mask of a segment's rows, None when nothing is masked."""
  bias = block_causal_bias(patch_nums)[begin:end, :end]
  return bias if bias.any() else None


def tiled() -> bool:
  """Whether programs traced now cut attention into cache-sized tiles.

  Only on the CPU, where an (N, l, S) score tensor far larger than the caches
  is slow to write and re-read; accelerators run the fused batch.
  """
  return jax.default_backend() == "cpu"


def _mapped(fn, n: int, rows: int, keys: int, *args):
  """Applies fn to groups of the leading axis of every arg; stacks results."""
  g = group_size(n, rows, keys) if tiled() else n
  if g == n:
    return fn(*args)
  grouped = [a.reshape((n // g, g) + a.shape[1:]) for a in args]
  out = jax.lax.map(lambda xs: fn(*xs), grouped)
  return jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), out)


def _scores(q, k, bias, scale, dtype):
  s = jnp.einsum("nlc,nsc->nls", q.astype(dtype), k.astype(dtype),
                 preferred_element_type=jnp.float32) * scale
  return s if bias is None else s + bias


def _fwd_tile(q, k, v, bias, scale, dtype):
  s = _scores(q, k, bias, scale, dtype)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  den = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("nls,nsc->nlc", (p / den).astype(dtype), v.astype(dtype),
                 preferred_element_type=jnp.float32)
  return o, (m + jnp.log(den))[..., 0]


def _bwd_tile(q, k, v, o, lse, do, bias, scale, dtype):
  p = jnp.exp(_scores(q, k, bias, scale, dtype) - lse[..., None])
  dv = jnp.einsum("nls,nlc->nsc", p.astype(dtype), do.astype(dtype),
                  preferred_element_type=jnp.float32)
  dp = jnp.einsum("nlc,nsc->nls", do.astype(dtype), v.astype(dtype),
                  preferred_element_type=jnp.float32)
  ds = p * (dp - jnp.sum(do * o, axis=-1, keepdims=True)) * scale
  dq = jnp.einsum("nls,nsc->nlc", ds.astype(dtype), k.astype(dtype),
                  preferred_element_type=jnp.float32)
  dk = jnp.einsum("nls,nlc->nsc", ds.astype(dtype), q.astype(dtype),
                  preferred_element_type=jnp.float32)
  return dq, dk, dv


def grouped_attention(q_NlC, k_NSc, v_NSc, bias_lS, scale, dtype):
  """softmax(q k^T * scale + bias) v over independent (row, head) pairs.

  q (N, l, c), k/v (N, S, c), bias broadcastable to (l, S) or None; on the
  CPU in groups of pairs whose scores fit in a few MiB (`tiled`).
  """
  n, l, _ = q_NlC.shape
  fn = functools.partial(_fwd_tile, bias=bias_lS, scale=scale, dtype=dtype)
  return _mapped(fn, n, l, k_NSc.shape[1], q_NlC, k_NSc, v_NSc)[0]


def _forward(patch_nums, scale, dtype, q, k, v):
  n = q.shape[0]
  outs, lses = [], []
  for begin, end, _ in segments(patch_nums):
    bias = _segment_bias(patch_nums, begin, end)
    fn = functools.partial(_fwd_tile, bias=bias, scale=scale, dtype=dtype)
    o, lse = _mapped(fn, n, end - begin, end, q[:, begin:end], k[:, :end],
                     v[:, :end])
    outs.append(o)
    lses.append(lse)
  return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def block_causal_attention(patch_nums, scale, dtype, q_NLc, k_NLc, v_NLc):
  """softmax(q k^T * scale + block-causal mask) v, head-major.

  Args:
    patch_nums: the scale sides (a tuple; static).
    scale: multiplier of the scores (static).
    dtype: matmul compute dtype; softmax and results are float32.
    q_NLc, k_NLc, v_NLc: (N, L, c) with N = batch x heads.

  Returns:
    (N, L, c) float32.
  """
  return _forward(patch_nums, scale, dtype, q_NLc, k_NLc, v_NLc)[0]


def _vjp_fwd(patch_nums, scale, dtype, q, k, v):
  o, lse = _forward(patch_nums, scale, dtype, q, k, v)
  return o, (q, k, v, o, lse)


def _vjp_bwd(patch_nums, scale, dtype, res, do):
  q, k, v, o, lse = res
  n, seq_len, _ = q.shape
  dq_parts = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for begin, end, _ in segments(patch_nums):
    bias = _segment_bias(patch_nums, begin, end)
    fn = functools.partial(_bwd_tile, bias=bias, scale=scale, dtype=dtype)
    rows = slice(begin, end)
    dq_s, dk_s, dv_s = _mapped(fn, n, end - begin, end, q[:, rows], k[:, :end],
                               v[:, :end], o[:, rows], lse[:, rows], do[:, rows])
    dq_parts.append(dq_s)
    pad = ((0, 0), (0, seq_len - end), (0, 0))
    dk = dk + jnp.pad(dk_s, pad)
    dv = dv + jnp.pad(dv_s, pad)
  dq = jnp.concatenate(dq_parts, axis=1)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


block_causal_attention.defvjp(_vjp_fwd, _vjp_bwd)
