"""Scale-wise residual quantization as explicit functions (NHWC).

`quant` below is a `vqvae.Quantizer` holding the codebook (V, C) and the Phi
convolutions; everything else is plain math over static scale lists.
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
def phi_index(si: int, num_scales: int, n_phi: int, share: int = 4) -> int:
  """Which Phi serves scale `si`: nearest tick to si / (K - 1)."""
  del share  # The tick rule depends only on how many Phis exist.
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
  """Continuous latent -> token ids per scale, each (B, pn*pn) int32."""
  return [idx for idx, _ in _residual_steps(quant, f_BHWC, patch_nums)]


def f_to_fhats(quant, f_BHWC, patch_nums: Sequence[int]) -> list[jax.Array]:
  """Continuous latent -> the accumulated f_hat after each scale."""
  return [fh for _, fh in _residual_steps(quant, f_BHWC, patch_nums)]


def idx_to_fhat(quant, idx_list, patch_nums: Sequence[int]) -> jax.Array:
  """Token ids of all scales -> the final f_hat (B, H, W, C)."""
  f_hat = 0.0
  for si, (idx, pn) in enumerate(zip(idx_list, patch_nums)):
    f_hat = f_hat + _upsample_phi(quant, lookup(quant, idx, pn), si,
                                  patch_nums)
  return f_hat


def idx_to_var_input(quant, idx_list, patch_nums: Sequence[int]) -> jax.Array:
  """Teacher-forcing input: f_hat after scale k, area-pooled to scale k+1.

  Returns (B, L - first_l, C): the inputs for every scale but the first.
  """
  f_hat, outs = 0.0, []
  for si in range(len(patch_nums) - 1):
    h = lookup(quant, idx_list[si], patch_nums[si])
    f_hat = f_hat + _upsample_phi(quant, h, si, patch_nums)
    nxt = area_resize(f_hat, patch_nums[si + 1])
    outs.append(nxt.reshape(nxt.shape[0], -1, nxt.shape[-1]))
  return jnp.concatenate(outs, axis=1)


def next_ar_input(quant, si: int, f_hat_BHWC, h_BhwC, patch_nums):
  """One sampling step: add scale si's codes; return (f_hat, next input map)."""
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
  """Training path with the straight-through estimator and the VQ loss."""
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
