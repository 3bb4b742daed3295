"""Scale-wise residual quantization as explicit functions (NHWC).

`quant` below is a `vqvae.Quantizer` holding the codebook (V, C) and the Phi
convolutions; everything else is plain math over static scale lists. The
official counterpart is `models/quant.py:VectorQuantizer2`; each function
names the method it corresponds to.

Names: `f_BHWC` is the encoder's continuous latent at the last scale's side
(H = W = patch_nums[-1]), C = Cvae; `idx_Bl` one scale's token ids, int32
(B, pn*pn) in [0, V), row-major; `f_hat` the running sum of every scale's
upsampled, Phi-refined codes, same shape as f. Latents are unbounded floats.

Codebook upkeep for tokenizer training (the usage EMA `ema_vocab_hit_SV`,
usage metrics and the restart of dead codes) is here too: it is math over
the codebook and the hit counts `quantize_train` returns.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models.interp import area_resize, bicubic_resize

_HI = jax.lax.Precision.HIGHEST


def num_phi(share_quant_resi: int, num_scales: int) -> int:
  """0: one Phi per scale; 1: one shared Phi; n: n partially shared Phis."""
  return num_scales if share_quant_resi == 0 else share_quant_resi


@functools.lru_cache(maxsize=None)
def phi_index(si: int, num_scales: int, n_phi: int) -> int:
  """Which Phi serves scale `si`: nearest tick to si / (K - 1).

  The tick rule depends only on how many Phis exist (`n_phi`).
  """
  if n_phi == 1:
    return 0
  k = n_phi
  lo = 1 / 3 / k if k == 4 else 1 / 2 / k
  ticks = np.linspace(lo, 1 - lo, k)
  at = si / (num_scales - 1) if num_scales > 1 else 0.0
  return int(np.argmin(np.abs(ticks - at)))


def nearest_code(z_NC: jax.Array, codebook_VC: jax.Array) -> jax.Array:
  """Index of the nearest code in squared L2 distance (first on ties)."""
  z_NC = z_NC.astype(jnp.float32)
  e = codebook_VC.astype(jnp.float32)
  # Same association as the reference: (|z|^2 + |e|^2) - 2 z.e
  d_NV = (jnp.sum(z_NC ** 2, axis=1, keepdims=True) + jnp.sum(e ** 2, axis=1))
  d_NV = d_NV - 2.0 * jnp.matmul(z_NC, e.T, precision=_HI)
  return jnp.argmin(d_NV, axis=1).astype(jnp.int32)


def lookup(quant, idx_Bl: jax.Array, pn: int) -> jax.Array:
  """Token ids (B, pn*pn) -> code map (B, pn, pn, C)."""
  h = jnp.take(quant.codebook_VC, idx_Bl, axis=0)
  return h.reshape(idx_Bl.shape[0], pn, pn, -1)


def _upsample_phi(quant, h_BhwC, si, patch_nums):
  """Brings one scale's codes to full resolution and applies its Phi."""
  size, k = patch_nums[-1], len(patch_nums)
  if si != k - 1:
    h_BhwC = bicubic_resize(h_BhwC, size)
  return quant.phi(h_BhwC, si, k)


def _check_full(f_BHWC, patch_nums):
  _, h, w, _ = f_BHWC.shape
  if (h, w) != (patch_nums[-1], patch_nums[-1]):
    raise ValueError(f"latent is {h}x{w} but the last scale is "
                     f"{patch_nums[-1]}x{patch_nums[-1]}")


def _residual_steps(quant, f_BHWC, patch_nums):
  """Yields (idx_Bl, f_hat) after each scale, from coarse to fine."""
  _check_full(f_BHWC, patch_nums)
  b, _, _, c = f_BHWC.shape
  f_rest = jax.lax.stop_gradient(f_BHWC).astype(jnp.float32)
  f_hat = jnp.zeros_like(f_rest)
  for si, pn in enumerate(patch_nums):
    z = area_resize(f_rest, pn) if si != len(patch_nums) - 1 else f_rest
    idx = nearest_code(z.reshape(-1, c), quant.codebook_VC).reshape(b, pn * pn)
    h = _upsample_phi(quant, lookup(quant, idx, pn), si, patch_nums)
    f_hat = f_hat + h
    f_rest = f_rest - h
    yield idx, f_hat


def f_to_idx(quant, f_BHWC, patch_nums: Sequence[int]) -> list[jax.Array]:
  """Continuous latent -> token ids per scale.

  Official: `VectorQuantizer2.f_to_idxBl_or_fhat(f, to_fhat=False)`.

  Args:
    quant: the `vqvae.Quantizer`.
    f_BHWC: float latent (B, pn_K, pn_K, C).
    patch_nums: the scale sides, coarse to fine; the last one is f's side.

  Returns:
    K arrays, int32 (B, pn*pn), ids in [0, V).

  Raises:
    ValueError: f's side is not patch_nums[-1].
  """
  return [idx for idx, _ in _residual_steps(quant, f_BHWC, patch_nums)]


def f_to_fhats(quant, f_BHWC, patch_nums: Sequence[int]) -> list[jax.Array]:
  """Continuous latent -> the accumulated f_hat after each scale.

  Official: `VectorQuantizer2.f_to_idxBl_or_fhat(f, to_fhat=True)`.

  Returns:
    K float32 arrays (B, pn_K, pn_K, C): f_hat after scales 0..si; the last
    is the full reconstruction's latent.
  """
  return [fh for _, fh in _residual_steps(quant, f_BHWC, patch_nums)]


def idx_to_fhat(quant, idx_list, patch_nums: Sequence[int]) -> jax.Array:
  """Token ids of all scales -> the final f_hat (B, pn_K, pn_K, C), float.

  Official: `VectorQuantizer2.embed_to_fhat(..., all_to_max_scale=True,
  last_one=True)` after the embedding lookup of `VQVAE.idxBl_to_img`.
  `idx_list`: K int arrays (B, pn*pn) in [0, V).
  """
  f_hat = 0.0
  for si, (idx, pn) in enumerate(zip(idx_list, patch_nums)):
    f_hat = f_hat + _upsample_phi(quant, lookup(quant, idx, pn), si,
                                  patch_nums)
  return f_hat


def idx_to_var_input(quant, idx_list, patch_nums: Sequence[int]) -> jax.Array:
  """Teacher-forcing input of VAR: f_hat after scale k, area-pooled to k+1.

  Official: `VectorQuantizer2.idxBl_to_var_input`.

  Args:
    quant: the `vqvae.Quantizer`.
    idx_list: K int arrays (B, pn*pn), ids in [0, V) (the last one unused).
    patch_nums: the scale sides, coarse to fine.

  Returns:
    float (B, L - first_l, C): the inputs of every scale but the first,
    scale k+1's map flattened row-major at its positions.
  """
  f_hat, outs = 0.0, []
  for si in range(len(patch_nums) - 1):
    h = lookup(quant, idx_list[si], patch_nums[si])
    f_hat = f_hat + _upsample_phi(quant, h, si, patch_nums)
    nxt = area_resize(f_hat, patch_nums[si + 1])
    outs.append(nxt.reshape(nxt.shape[0], -1, nxt.shape[-1]))
  return jnp.concatenate(outs, axis=1)


def next_ar_input(quant, si: int, f_hat_BHWC, h_BhwC, patch_nums):
  """One sampling step: adds scale si's codes to f_hat.

  Official: `VectorQuantizer2.get_next_autoregressive_input`.

  Args:
    quant: the `vqvae.Quantizer`.
    si: the scale just sampled (static).
    f_hat_BHWC: float (B, pn_K, pn_K, C), the sum of scales < si (0 at si=0).
    h_BhwC: scale si's code vectors (B, pn, pn, C) (`lookup` of its ids).
    patch_nums: the scale sides, coarse to fine.

  Returns:
    (new f_hat (B, pn_K, pn_K, C), next scale's input map (B, pn_{si+1},
    pn_{si+1}, C)); at the last scale the second is f_hat itself.
  """
  f_hat_BHWC = f_hat_BHWC + _upsample_phi(quant, h_BhwC, si, patch_nums)
  if si == len(patch_nums) - 1:
    return f_hat_BHWC, f_hat_BHWC
  return f_hat_BHWC, area_resize(f_hat_BHWC, patch_nums[si + 1])


class QuantOut(NamedTuple):
  f_hat: jax.Array  # straight-through f_hat: forward value f_hat, grad to f.
  vq_loss: jax.Array  # mean over scales of beta*commit + codebook terms.
  hits_SV: jax.Array  # code usage counts per scale.
  idx: list  # token ids per scale.


def quantize_train(quant, f_BHWC, patch_nums, beta: float) -> QuantOut:
  """Training path with the straight-through estimator and the VQ loss.

  Official: `VectorQuantizer2.forward` (training mode; the usage EMA it
  updates in place is `update_ema` here, applied by the caller).

  Args:
    quant: the `vqvae.Quantizer`.
    f_BHWC: float latent (B, pn_K, pn_K, C), any float dtype (quantized in
      float32).
    patch_nums: the scale sides, coarse to fine.
    beta: commitment weight.

  Returns:
    `QuantOut`: f_hat float32 (value f_hat, gradient to f), the VQ loss
    scalar, hits_SV float32 (K, V) and the ids per scale.
  """
  _check_full(f_BHWC, patch_nums)
  f = f_BHWC.astype(jnp.float32)
  f_ng = jax.lax.stop_gradient(f)
  b, _, _, c = f.shape
  v = quant.codebook_VC.shape[0]
  f_rest, f_hat = f_ng, jnp.zeros_like(f_ng)
  loss, hits, idxs = 0.0, [], []
  for si, pn in enumerate(patch_nums):
    z = area_resize(f_rest, pn) if si != len(patch_nums) - 1 else f_rest
    idx = nearest_code(z.reshape(-1, c), jax.lax.stop_gradient(
        quant.codebook_VC)).reshape(b, pn * pn)
    hits.append(jnp.zeros((v,), jnp.float32).at[idx.reshape(-1)].add(1.0))
    idxs.append(idx)
    h = _upsample_phi(quant, lookup(quant, idx, pn), si, patch_nums)
    f_hat = f_hat + h
    f_rest = f_rest - jax.lax.stop_gradient(h)
    commit = jnp.mean((jax.lax.stop_gradient(f_hat) - f) ** 2)
    codebook = jnp.mean((f_hat - f_ng) ** 2)
    loss = loss + commit * beta + codebook
  loss = loss / len(patch_nums)
  f_st = jax.lax.stop_gradient(f_hat) - f_ng + f
  return QuantOut(f_st, loss, jnp.stack(hits), idxs)


# ------------------------------------------------------------ codebook upkeep
# The official usage margin: a code counts as used with >= 8% of a uniform
# share of the tokens.
USAGE_MARGIN = 0.08


def update_ema(ema_SV, hits_SV, step_i):
  """The official `ema_vocab_hit_SV` rule, with its per-(call, scale) counter.

  Official: the `record_hit` branch of `VectorQuantizer2.forward`. The
  reference counts one record per scale per training forward: record
  t * S + si copies the hits when 0, else decays by 0.9 below 100, else 0.99.

  Args:
    ema_SV: float32 (S, V) usage EMA before step `step_i`.
    hits_SV: float32 (S, V) code counts of this step (`QuantOut.hits_SV`).
    step_i: int scalar, 0-based step.
  """
  s = ema_SV.shape[0]
  rec = step_i * s + jnp.arange(s)
  decay = jnp.where(rec == 0, 0.0, jnp.where(rec < 100, 0.9, 0.99))[:, None]
  return ema_SV * decay + hits_SV * (1.0 - decay)


def uniform_share(batch: int, patch_nums, vocab: int) -> jax.Array:
  """Hits per code per step if all codes were used equally, per scale (S,)."""
  return jnp.asarray([batch * pn * pn / vocab for pn in patch_nums],
                     jnp.float32)


def residual_vectors(quant, f_BHWC, patch_nums) -> jax.Array:
  """The vectors each scale quantizes (area-pooled residuals), float (N, C)."""
  c = f_BHWC.shape[-1]
  fhats = f_to_fhats(quant, f_BHWC, patch_nums)
  out, prev = [], 0.0
  for si, pn in enumerate(patch_nums):
    r = area_resize(f_BHWC - prev, pn)
    out.append(r.reshape(-1, c))
    prev = fhats[si]
  return jnp.concatenate(out)


def restart_dead_codes(quant, f_BHWC, ema_SV, key, patch_nums,
                       threshold: float):
  """Re-initialises codes whose usage EMA fell below a share of uniform use.

  Dead codes (summed EMA over scales < `threshold` x the summed uniform
  share) restart at random latent vectors of the batch (the residuals the
  scales quantize, with tiny noise so no two coincide). Their usage restarts
  from zero: the next check judges only what they did since. No official
  counterpart (the reference keeps dead codes).

  Returns:
    (codebook float (V, C), ema float32 (S, V), number restarted int32).
  """
  codebook_VC = quant.codebook_VC
  v = codebook_VC.shape[0]
  share_S = uniform_share(f_BHWC.shape[0], patch_nums, v)
  dead_V = jnp.sum(ema_SV, axis=0) < threshold * jnp.sum(share_S)
  z_NC = residual_vectors(quant, f_BHWC.astype(jnp.float32), patch_nums)
  n = z_NC.shape[0]
  k_pick, k_noise = jax.random.split(key)
  pick = jax.random.choice(k_pick, n, (v,), replace=n < v)
  scale = jnp.sqrt(jnp.mean(z_NC * z_NC)) * 1e-3
  new_VC = z_NC[pick] + scale * jax.random.normal(k_noise, codebook_VC.shape)
  codebook_VC = jnp.where(dead_V[:, None], new_VC.astype(codebook_VC.dtype),
                          codebook_VC)
  ema_SV = jnp.where(dead_V[None, :], 0.0, ema_SV)
  return codebook_VC, ema_SV, jnp.sum(dead_V).astype(jnp.int32)


def usage_metrics(ema_SV, hits_SV, batch: int, patch_nums) -> dict:
  """Codebook usage and perplexity from the EMA and this step's hits.

  Returns float32 scalars / (S,) arrays: 'usage' (% of codes whose summed
  EMA reaches the official margin), 'scale_usage' (the same per scale, the
  official `usages`) and 'scale_ppl' (perplexity of each scale's hits).
  """
  v = ema_SV.shape[1]
  share_S = uniform_share(batch, patch_nums, v)
  used_S = jnp.mean(ema_SV >= USAGE_MARGIN * share_S[:, None], axis=1) * 100
  used = jnp.mean(jnp.sum(ema_SV, 0) >= USAGE_MARGIN * jnp.sum(share_S)) * 100
  p_SV = hits_SV / jnp.sum(hits_SV, axis=1, keepdims=True)
  ent_S = -jnp.sum(jnp.where(p_SV > 0, p_SV * jnp.log(p_SV), 0.0), axis=1)
  return {"usage": used, "scale_usage": used_S, "scale_ppl": jnp.exp(ent_S)}
