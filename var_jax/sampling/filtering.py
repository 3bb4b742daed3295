"""Top-k / top-p filtering, categorical sampling and Gumbel-softmax smoothing.

The keep-mask follows the official `sample_with_top_k_top_p_`: top-k keeps
every logit not below the k-th largest (ties survive), then top-p sorts the
survivors ascending and drops the prefix whose softmax mass is at most
1 - top_p, never the largest. Both are computed without sorting (bisection
on the float bit patterns), which is several times faster on CPU. Everything
here works on float32 logits with any leading shape; the vocabulary is the
last axis. The temperature (CoDe's per-scale `temp`) divides the filtered
logits just before the draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _sortable_key(x):
  """Order-preserving uint32 key of float32 values: x < y iff key(x) < key(y).

  (-0.0 sorts just below +0.0; NaN is not expected.)
  """
  b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _bisect_key(pred):
  """The `fori_loop` body of a bisection for the largest uint32 `t` (per
  row) with `pred(t)` true; run it for bits 0..31 from zeros.

  `pred` maps (...,) candidate keys to (...,) bools, true on a prefix
  [0, t*]. Step i sets bit 31 - i when the candidate still satisfies `pred`:
  32 cheap vectorised passes over the vocabulary instead of a sort, which
  XLA runs slowly on CPU.
  """
  def body(i, ans):
    cand = ans | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    return jnp.where(pred(cand), cand, ans)

  return body


def is_static(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating))


def keep_mask(logits_NV: jax.Array, top_k=0, top_p=0.0) -> jax.Array:
  """Which logits survive top-k then top-p filtering (bool, same shape).

  The keep set of the official `sample_with_top_k_top_p_` (FoundationVision
  VAR `models/helpers.py`). Both thresholds are found by bisection on the
  values' bit patterns: top-k keeps the values not below the k-th largest;
  top-p drops the kept values whose softmax mass, summed over all kept
  values up to and including them in ascending order, is at most 1 - top_p,
  never the largest. This equals the reference's sort-and-cumsum except
  inside exact ties at the top-p boundary (the reference splits such a tie
  by sort position; here the tie is kept or dropped as a whole).

  Args:
    logits_NV: float logits, vocabulary last, any leading shape.
    top_k: keep the k largest (0 or >= V: no top-k). A Python int is
      static; a traced int32 scalar (e.g. one scale's entry of a per-scale
      schedule inside a scan) gives the same mask.
    top_p: nucleus mass to keep, in [0, 1] (0: no top-p). A Python float is
      static; a traced value must come with `budget` precomputed, see
      `top_p_budget`, and is passed as the pair (top_p, budget).

  Raises nothing: the values are checked where options are made
  (`SampleOptions`).
  """
  logits_NV = logits_NV.astype(jnp.float32)
  v = logits_NV.shape[-1]
  lead = logits_NV.shape[:-1]
  key_NV = _sortable_key(logits_NV)
  keep = jnp.ones(logits_NV.shape, bool)
  zero = jnp.zeros(lead, jnp.uint32)
  if is_static(top_k):
    k = int(top_k) if 0 < top_k < v else None
  else:
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v)  # v keeps everything.
  if k is not None:
    # The k-th largest key: the largest t with at least k keys >= t.
    kth = jax.lax.fori_loop(0, 32, _bisect_key(
        lambda t: jnp.sum(key_NV >= t[..., None], axis=-1) >= k), zero)
    keep = key_NV >= kth[..., None]
  if is_static(top_p):
    if top_p > 0:
      keep = keep & ~_top_p_drop(logits_NV, key_NV, keep, top_p_budget(top_p))
  else:
    p, budget = top_p
    keep = keep & ~(_top_p_drop(logits_NV, key_NV, keep, budget) & (p > 0))
  return keep


def _top_p_drop(logits_NV, key_NV, keep, budget):
  """The kept values top-p removes: the ascending prefix within `budget`."""
  top = jnp.max(logits_NV, axis=-1, keepdims=True)
  e = jnp.where(keep, jnp.exp(logits_NV - top), 0.0)
  probs = e / jnp.sum(e, axis=-1, keepdims=True)  # softmax over kept
  # The largest t whose kept mass at or below it is within the budget.
  zero = jnp.zeros(logits_NV.shape[:-1], jnp.uint32)
  cut = jax.lax.fori_loop(0, 32, _bisect_key(
      lambda t: jnp.sum(jnp.where(key_NV <= t[..., None], probs, 0.0),
                        axis=-1) <= budget), zero)
  return (key_NV <= cut[..., None]) & (logits_NV < top)


def top_p_budget(top_p: float) -> np.float32:
  """1 - top_p rounded once to float32, as the reference's comparison uses."""
  return np.float32(1 - float(top_p))


def filter_logits(logits_NV: jax.Array, top_k=0, top_p=0.0) -> jax.Array:
  """Float32 logits with the filtered-out entries set to -inf."""
  logits_NV = logits_NV.astype(jnp.float32)
  return jnp.where(keep_mask(logits_NV, top_k, top_p), logits_NV, -jnp.inf)


def categorical(keys_N: jax.Array, filtered_NV: jax.Array,
                temperature) -> jax.Array:
  """One draw per row from softmax(filtered / temperature), own key per row.

  The temperature divides the logits after filtering, just before the draw
  (CoDe's `sample_with_top_k_top_p_(..., temp)`): the keep set is decided on
  the untempered logits.

  Per-row keys make a token's draw independent of how many rows share the
  call, so padded and unpadded decoding (and any batch split) agree.
  """
  lead = filtered_NV.shape[:-1]
  flat_keys = keys_N.reshape((-1,) + keys_N.shape[len(lead):])
  flat = filtered_NV.reshape(-1, filtered_NV.shape[-1]) / temperature
  idx = jax.vmap(jax.random.categorical)(flat_keys, flat)
  return idx.reshape(lead).astype(jnp.int32)


def gumbel_temperature(ratio: float) -> float:
  """Softmax temperature of the `more_smooth` schedule (MaskGIT style)."""
  return max(0.27 * (1 - ratio * 0.95), 0.005)


def gumbel_soft_embed(keys_N: jax.Array, filtered_NV: jax.Array,
                      codebook_VC: jax.Array, scale, tau) -> jax.Array:
  """Soft code vectors: softmax((logits * scale + g) / tau) @ codebook.

  The reference uses scale = 1 + ratio and tau = gumbel_temperature(ratio)
  at ratio = si / (K - 1); both may be traced scalars. As there, the Gumbel
  noise is added to the already filtered logits, so filtered entries get
  zero weight.

  Returns:
    (..., C) float32, one soft embedding per row of `filtered_NV`.
  """
  lead, v = filtered_NV.shape[:-1], filtered_NV.shape[-1]
  flat_keys = keys_N.reshape((-1,) + keys_N.shape[len(lead):])
  g = jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(flat_keys)
  z = (filtered_NV.reshape(-1, v) * scale + g) / tau
  probs = jax.nn.softmax(z, axis=-1)
  soft = jnp.matmul(probs, codebook_VC.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
  return soft.reshape(lead + (codebook_VC.shape[-1],))
