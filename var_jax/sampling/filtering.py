"""Top-k / top-p filtering, categorical sampling and Gumbel-softmax smoothing.

The keep-mask follows the official `sample_with_top_k_top_p_`: top-k keeps
every logit not below the k-th largest (ties survive), then top-p sorts the
survivors ascending and drops the prefix whose softmax mass is at most
1 - top_p, never the largest. Everything here works on float32 logits with any
leading shape; the vocabulary is the last axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def keep_mask(logits_NV: jax.Array, top_k: int = 0,
              top_p: float = 0.0) -> jax.Array:
  """Which logits survive top-k then top-p filtering (bool, same shape).

  Args:
    logits_NV: float logits, vocabulary last.
    top_k: keep the k largest (0 or >= V: no top-k).
    top_p: nucleus mass to keep (0: no top-p).
  """
  logits_NV = logits_NV.astype(jnp.float32)
  v = logits_NV.shape[-1]
  keep = jnp.ones(logits_NV.shape, bool)
  if 0 < top_k < v:
    kth = jax.lax.top_k(logits_NV, top_k)[0][..., -1:]
    keep = logits_NV >= kth
  if top_p > 0:
    masked = jnp.where(keep, logits_NV, -jnp.inf)
    order = jnp.argsort(masked, axis=-1)  # ascending, as the reference
    sorted_l = jnp.take_along_axis(masked, order, axis=-1)
    mass = jnp.cumsum(jax.nn.softmax(sorted_l, axis=-1), axis=-1)
    drop_sorted = mass <= (1 - top_p)
    drop_sorted = drop_sorted.at[..., -1].set(False)
    # Scatter back to vocabulary order (the reference's `scatter`).
    drop = jnp.put_along_axis(jnp.zeros_like(drop_sorted), order, drop_sorted,
                              axis=-1, inplace=False)
    keep = keep & ~drop
  return keep


def filter_logits(logits_NV: jax.Array, top_k: int = 0,
                  top_p: float = 0.0) -> jax.Array:
  """Float32 logits with the filtered-out entries set to -inf."""
  logits_NV = logits_NV.astype(jnp.float32)
  return jnp.where(keep_mask(logits_NV, top_k, top_p), logits_NV, -jnp.inf)


def categorical(keys_N: jax.Array, filtered_NV: jax.Array) -> jax.Array:
  """One draw per row from softmax(filtered), each row with its own key.

  Per-row keys make a token's draw independent of how many rows share the
  call, so padded and unpadded decoding (and any batch split) agree.
  """
  lead = filtered_NV.shape[:-1]
  flat_keys = keys_N.reshape((-1,) + keys_N.shape[len(lead):])
  flat = filtered_NV.reshape(-1, filtered_NV.shape[-1])
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
