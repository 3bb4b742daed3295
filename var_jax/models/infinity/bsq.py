"""Infinity's bitwise tokenizer: a VQGAN encoder/decoder (no attention) and
a multi-scale binary spherical quantizer (NHWC).

Each scale takes the residual (features minus the codes so far), shrinks it
to the scale's (h, w) by area averaging, normalises every position to unit
length over its d channels and keeps the sign of each channel: d bits per
token, code +-1/sqrt(d). The codes are enlarged back bilinearly (PyTorch's
`trilinear` on one frame: no antialiasing) and subtracted. The transformer
reads, for the next scale, the running sum of enlarged codes resized
bilinearly to that scale's grid.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from var_jax.models import interp
from var_jax.models.layers import l2_normalize
from var_jax.models.vqgan import Decoder, Encoder


@dataclasses.dataclass(frozen=True)
class BSQConfig:
  """A BSQ tokenizer; it shrinks images by 2^(len(ch_mult) - 1)."""

  codebook_dim: int
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
  num_res_blocks: int = 2
  # The 8B model's transformer sees 2x2 groups of tokens (4d channels).
  spatial_patchify: bool = False

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


# The released tokenizers (`infinity_vae_d32reg.pth` with the 2B model,
# `infinity_vae_d56_f8_14_patchify.pth` with the 8B).
BSQ_D32 = BSQConfig(codebook_dim=32)
BSQ_D14_PATCHIFY = BSQConfig(codebook_dim=14, ch_mult=(1, 2, 4, 4),
                             spatial_patchify=True)


def quantize(r_BhwC: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(codes, bits) of one scale's residual: bit = normalised value > 0,
  code = +-1/sqrt(d) (written z + (code - z), as the reference's
  straight-through form rounds it)."""
  d = r_BhwC.shape[-1]
  z = l2_normalize(r_BhwC.astype(jnp.float32))
  pos = z > 0
  code = jnp.where(pos, 1.0, -1.0) * jnp.float32(1 / math.sqrt(d))
  return z + (code - z), pos.astype(jnp.int32)


def bits_to_codes(bits_BhwC: jax.Array) -> jax.Array:
  """Codes of 0/1 bits, as the reference rebuilds them (2 s b - s, then
  normalised; s = 1/sqrt(d))."""
  s = jnp.float32(1 / math.sqrt(bits_BhwC.shape[-1]))
  return l2_normalize(bits_BhwC.astype(jnp.float32) * s * 2 - s)


class Encoding(NamedTuple):
  """The tokenizer's view of images: the encoder's features (B, H, W, d);
  per scale (coarse to fine) the area-shrunk residual it quantized
  (B, h, w, d), the codes and the bits; and the sum of the enlarged codes
  (B, H, W, d), what the decoder reads."""

  features: jax.Array
  residuals: list
  codes: list
  bits: list
  summed_BHWC: jax.Array


def patchify(x_BHWC: jax.Array) -> jax.Array:
  """(B, 2h, 2w, d) -> (B, h, w, 4d): each 2x2 group of positions becomes
  one token, channel c of offset (i, j) at 4c + 2i + j (PyTorch's
  pixel_unshuffle(2) order)."""
  b, hh, ww, d = x_BHWC.shape
  x = x_BHWC.reshape(b, hh // 2, 2, ww // 2, 2, d)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, hh // 2, ww // 2, 4 * d)


def unpatchify(x_BhwC: jax.Array) -> jax.Array:
  """The inverse of `patchify`: (B, h, w, 4d) -> (B, 2h, 2w, d)."""
  b, h, w, dd = x_BhwC.shape
  x = x_BhwC.reshape(b, h, w, dd // 4, 2, 2)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, dd // 4)


def flatten(x_BhwC: jax.Array) -> jax.Array:
  """(B, h, w, C) -> (B, h * w, C), row-major, as the sequence lays out."""
  b, h, w, c = x_BhwC.shape
  return x_BhwC.reshape(b, h * w, c)


class BSQVAE(nnx.Module):
  """Encoder, decoder and the multi-scale quantizer (no parameters)."""

  def __init__(self, cfg: BSQConfig, *, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    self.cfg = cfg
    stack = (cfg.ch, cfg.ch_mult, cfg.num_res_blocks)
    self.encoder = Encoder(*stack, 3, cfg.codebook_dim, attention=False,
                           rngs=rngs)
    self.decoder = Decoder(*stack, cfg.codebook_dim, 3, attention=False,
                           rngs=rngs)

  def features(self, img_BHWC: jax.Array) -> jax.Array:
    """Images in [-1, 1] -> unquantized features (B, H/f, W/f, d)."""
    return self.encoder(img_BHWC).astype(jnp.float32)

  def encode(self, img_BHWC: jax.Array, grids) -> Encoding:
    """Images -> bits of every scale of `grids` ((h, w) coarse to fine; the
    last is the feature map's size)."""
    f = self.features(img_BHWC)
    size = f.shape[1:3]
    residual, summed = f, jnp.zeros_like(f)
    rs, cs, bs = [], [], []
    for hw in grids:
      r = interp.area_resize(residual, hw)
      code, bits = quantize(r)
      up = interp.bilinear_resize(code, size)
      residual, summed = residual - up, summed + up
      rs.append(r)
      cs.append(code)
      bs.append(bits)
    return Encoding(f, rs, cs, bs, summed)

  def decode(self, summed_BHWC: jax.Array) -> jax.Array:
    """Summed codes -> images in [-1, 1]."""
    return jnp.clip(self.decoder(summed_BHWC), -1.0, 1.0)


def teacher_forcing_inputs(f_BHWC: jax.Array, grids):
  """(inputs of scales 1.. (B, L - 1, d), bits of every scale (B, L, d)) of
  features, as the trainer forms them: each scale quantizes the features
  minus the running sum of enlarged codes, shrunk by area; the next scale
  reads that running sum resized bilinearly to its grid."""
  size = f_BHWC.shape[1:3]
  cum = jnp.zeros_like(f_BHWC)
  inputs, bits = [], []
  for si, hw in enumerate(grids):
    code, b = quantize(interp.area_resize(f_BHWC - cum, hw))
    bits.append(flatten(b))
    cum = cum + interp.bilinear_resize(code, size)
    if si + 1 < len(grids):
      inputs.append(flatten(interp.bilinear_resize(cum, grids[si + 1])))
  return jnp.concatenate(inputs, 1), jnp.concatenate(bits, 1)


def summed_codes(bits, grids, size) -> jax.Array:
  """The decoder's input from each scale's bits ((B, h, w, d) or flat
  (B, h * w, d)): the sum of their codes, enlarged to `size`."""
  out = 0.0
  for b, (h, w) in zip(bits, grids):
    b = b.reshape(b.shape[0], h, w, b.shape[-1])
    out = out + interp.bilinear_resize(bits_to_codes(b), size)
  return out
