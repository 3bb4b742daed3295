"""The multi-scale residual VQVAE tokenizer (NHWC), as Flax NNX modules.

The encoder/decoder follow the VQGAN f16 layout the official model uses
(`models/vqvae.py:VQVAE`, `models/basic_vae.py`); the quantizer math is in
`quantizer.py` as explicit functions over these weights.

Value ranges: images are float (B, H, W, 3) in [-1, 1] everywhere in this
module (the sampler converts to [0, 1] for output); token ids are int32
(B, pn*pn) in [0, V), one array per scale, coarse to fine.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from var_jax.models.var.config import VQVAEConfig
from var_jax.models.var import quantizer as q
from var_jax.models.vqgan import Decoder, Encoder, conv


class Buffer(nnx.Variable):
  """Non-trainable state that the official model keeps (usage statistics)."""


class Quantizer(nnx.Module):
  """Weights of the residual quantizer: the codebook and the shared Phi convs."""

  def __init__(self, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedding = nnx.Embed(cfg.vocab_size, cfg.z_channels, rngs=rngs)
    n_phi = q.num_phi(cfg.share_quant_resi, len(cfg.v_patch_nums))
    self.quant_resi = nnx.List([
        conv(cfg.z_channels, cfg.z_channels, 3, rngs) for _ in range(n_phi)
    ]) if abs(cfg.quant_resi) > 1e-6 else nnx.List([])
    self.ema_vocab_hit_SV = Buffer(
        jnp.zeros((len(cfg.v_patch_nums), cfg.vocab_size), jnp.float32))

  @property
  def codebook_VC(self) -> jax.Array:
    return self.embedding.embedding[...]

  def phi(self, h_BHWC: jax.Array, si: int, num_scales: int) -> jax.Array:
    """Phi_k(h) = (1 - r) h + r conv_k(h), with k chosen by the tick rule."""
    if not len(self.quant_resi):
      return h_BHWC
    k = q.phi_index(si, num_scales, len(self.quant_resi))
    r = abs(self.cfg.quant_resi)
    return h_BHWC * (1 - r) + self.quant_resi[k](h_BHWC) * r


class VQVAE(nnx.Module):
  """Encoder, decoder, quantizer and the two 3x3 latent convolutions."""

  def __init__(self, cfg: VQVAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    stack = (cfg.ch, cfg.ch_mult, cfg.num_res_blocks)
    self.encoder = Encoder(*stack, cfg.in_channels, cfg.z_channels,
                           attention=True, rngs=rngs)
    self.decoder = Decoder(*stack, cfg.z_channels, cfg.in_channels,
                           attention=True, rngs=rngs)
    self.quantize = Quantizer(cfg, rngs=rngs)
    self.quant_conv = conv(cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks,
                            rngs)
    self.post_quant_conv = conv(cfg.z_channels, cfg.z_channels,
                                 cfg.quant_conv_ks, rngs)

  def encode(self, img_BHWC: jax.Array) -> jax.Array:
    """Images in [-1, 1] -> continuous latent f (B, h, w, Cvae)."""
    return self.quant_conv(self.encoder(img_BHWC))

  def decode(self, f_hat_BhwC: jax.Array) -> jax.Array:
    """Latent -> image in [-1, 1] (clamped, as the official fhat_to_img)."""
    return jnp.clip(self.decoder(self.post_quant_conv(f_hat_BhwC)), -1, 1)

  def img_to_idx(self, img_BHWC, patch_nums=None) -> list[jax.Array]:
    """Images -> token ids per scale (official `VQVAE.img_to_idxBl`).

    Args:
      img_BHWC: float (B, H, W, 3) in [-1, 1], H = W = `cfg.resolution`.
      patch_nums: scale sides (default `cfg.v_patch_nums`); the last must be
        the latent's side.

    Returns:
      K int32 arrays (B, pn*pn), ids in [0, vocab_size).
    """
    f = self.encode(img_BHWC)
    return q.f_to_idx(self.quantize, f, patch_nums or self.cfg.v_patch_nums)

  def img_to_fhats(self, img_BHWC, patch_nums=None) -> list[jax.Array]:
    """Images in [-1, 1] (B, H, W, 3) -> f_hat after each scale.

    Official: the first half of `VQVAE.img_to_reconstructed_img`
    (`f_to_idxBl_or_fhat(f, to_fhat=True)`). Returns K float32 latents
    (B, pn_K, pn_K, Cvae); `decode` of the last is the reconstruction.
    """
    f = self.encode(img_BHWC)
    return q.f_to_fhats(self.quantize, f, patch_nums or self.cfg.v_patch_nums)

  def idx_to_img(self, idx_list, patch_nums=None) -> jax.Array:
    """Token ids per scale -> images (official `VQVAE.idxBl_to_img(...,
    same_shape=True, last_one=True)`).

    Args:
      idx_list: K int arrays (B, pn*pn), ids in [0, vocab_size).
      patch_nums: scale sides (default `cfg.v_patch_nums`).

    Returns:
      float (B, H, W, 3) in [-1, 1] (clamped).
    """
    pn = patch_nums or self.cfg.v_patch_nums
    return self.decode(q.idx_to_fhat(self.quantize, idx_list, pn))

  def __call__(self, img_BHWC) -> "TrainOut":
    """The training forward (official `VQVAE.forward`), as `train-vae` runs it.

    Encodes in the input's dtype, quantizes in float32 with the straight-
    through estimator, decodes the straight-through f_hat in the input's
    dtype again.

    Args:
      img_BHWC: float (B, H, W, 3) in [-1, 1].

    Returns:
      `TrainOut`; `rec` is not clamped (the losses see the raw output).
    """
    f = self.encode(img_BHWC)
    out = q.quantize_train(self.quantize, f, self.cfg.v_patch_nums,
                           self.cfg.beta)
    h = self.decoder.trunk(self.post_quant_conv(
        out.f_hat.astype(img_BHWC.dtype)))
    return TrainOut(self.decoder.conv_out(h), out, f, h)


class TrainOut(NamedTuple):
  """What the training forward returns."""

  rec: jax.Array  # (B, H, W, 3) reconstruction, unclamped, compute dtype.
  quant: q.QuantOut  # Straight-through f_hat, VQ loss, hits, ids.
  f: jax.Array  # (B, h, w, Cvae) encoder latent.
  h: jax.Array  # (B, H, W, ch) decoder features before `conv_out`.


def psnr(rec_BHWC, x_BHWC) -> jax.Array:
  """Per-image PSNR in dB, float32 (B,), of images in [-1, 1].

  `rec_BHWC` is clipped to [-1, 1]; the error is measured on the [0, 1]
  scale (peak 1), and the MSE floored at 1e-10 (at most 100 dB).
  """
  d = (jnp.clip(rec_BHWC.astype(jnp.float32), -1, 1)
       - x_BHWC.astype(jnp.float32)) / 2
  mse_B = jnp.maximum(jnp.mean(d * d, axis=(1, 2, 3)), 1e-10)
  return -10.0 * jnp.log10(mse_B)


def one_image_at_a_time(fn, x_B):
  """`fn` (encoder or decoder) over a batch, one image per call (`lax.map`).

  On CPU the full-resolution activations of one image already exceed the
  caches; a batch of them turns the convolutions and normalisations
  memory-bound (d16 decoder: 2.6 s per image one by one, 3.3 s at batch 8;
  encoder: 1.58 s against 1.89 s at batch 4). Accelerators take the batch.
  """
  return jax.lax.map(lambda x: fn(x[None])[0], x_B)


def jit_tokenizer(vae: VQVAE, patch_nums=None):
  """The package's one images -> tokens function (`encode`, `tokenize`, edits).

  Returns a jitted callable: images (B, H, W, 3), uint8 in [0, 255] or float
  in [-1, 1], -> K int32 token maps (B, pn*pn), one per scale of
  `patch_nums` (default: the tokenizer's). uint8 images are scaled inside
  the program as the data pipeline scales them (`data.augment.to_pm1`:
  x / 255, then x + x - 1), so a uint8 image and its float form give the
  same tokens.
  """
  graphdef, state = nnx.split(vae)
  pn = tuple(patch_nums or vae.cfg.v_patch_nums)

  def tokenize(x_BHWC) -> list[jax.Array]:
    x_BHWC = jnp.asarray(x_BHWC)
    if x_BHWC.dtype != jnp.uint8:
      x_BHWC = x_BHWC.astype(jnp.float32)
    return _img_to_idx(state, x_BHWC, graphdef=graphdef, patch_nums=pn)

  return tokenize


@functools.partial(jax.jit, static_argnames=("graphdef", "patch_nums"))
def _img_to_idx(state, x_BHWC, *, graphdef, patch_nums):
  """`jit_tokenizer`'s program, one per tokenizer structure, scale list and
  input shape for the whole process (not one per `jit_tokenizer` call)."""
  if x_BHWC.dtype == jnp.uint8:
    x_BHWC = x_BHWC.astype(jnp.float32) / jnp.float32(255.0)
    x_BHWC = x_BHWC + x_BHWC - jnp.float32(1.0)
  return nnx.merge(graphdef, state).img_to_idx(x_BHWC, patch_nums)
