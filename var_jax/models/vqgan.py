"""The VQGAN convolution stack shared by the tokenizers (NHWC), as Flax NNX
modules: residual blocks with GroupNorm(32, eps 1e-6) and SiLU, 2x
down/upsampling, optional spatial self-attention.

VAR's VQVAE uses it with attention (its coarsest level and middle), the
Infinity BSQ tokenizer without. Parameter names follow the official
modules' (`down.{i}.block.{j}.conv1`, `mid.block_1`, `up.{i}.upsample`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def conv(cin, cout, k, rngs, stride=1, padding=None):
  pad = k // 2 if padding is None else padding
  return nnx.Conv(cin, cout, (k, k), strides=stride,
                  padding=((pad, pad), (pad, pad)), rngs=rngs)


def group_norm(c, rngs):
  # The official GroupNorm(32, eps=1e-6); exact two-pass variance.
  return nnx.GroupNorm(c, num_groups=32, epsilon=1e-6, use_fast_variance=False,
                       rngs=rngs)


class ResnetBlock(nnx.Module):

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.norm1 = group_norm(cin, rngs)
    self.conv1 = conv(cin, cout, 3, rngs)
    self.norm2 = group_norm(cout, rngs)
    self.conv2 = conv(cout, cout, 3, rngs)
    self.nin_shortcut = conv(cin, cout, 1, rngs) if cin != cout else None

  def __call__(self, x_BHWC):
    h = self.conv1(nnx.silu(self.norm1(x_BHWC)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    skip = x_BHWC if self.nin_shortcut is None else self.nin_shortcut(x_BHWC)
    return skip + h


class AttnBlock(nnx.Module):
  """Single-head spatial self-attention with a fused 1x1 qkv convolution."""

  def __init__(self, c: int, *, rngs: nnx.Rngs):
    self.norm = group_norm(c, rngs)
    self.qkv = conv(c, 3 * c, 1, rngs)
    self.proj_out = conv(c, c, 1, rngs)

  def __call__(self, x_BHWC):
    b, h, w, c = x_BHWC.shape
    qkv = self.qkv(self.norm(x_BHWC)).reshape(b, h * w, 3 * c)
    q_, k_, v_ = jnp.split(qkv, 3, axis=-1)
    w_BLL = jnp.einsum("bic,bjc->bij", q_, k_) * (c ** -0.5)
    w_BLL = jax.nn.softmax(w_BLL, axis=-1)
    o = jnp.einsum("bij,bjc->bic", w_BLL, v_).reshape(b, h, w, c)
    return x_BHWC + self.proj_out(o)


class Downsample(nnx.Module):

  def __init__(self, c: int, *, rngs: nnx.Rngs):
    self.conv = conv(c, c, 3, rngs, stride=2, padding=0)

  def __call__(self, x_BHWC):
    # Asymmetric zero pad (bottom/right only) before the strided conv.
    return self.conv(jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):

  def __init__(self, c: int, *, rngs: nnx.Rngs):
    self.conv = conv(c, c, 3, rngs)

  def __call__(self, x_BHWC):
    x = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
    return self.conv(x)


class Level(nnx.Module):
  """One resolution of the encoder or decoder: res blocks, attention, resample."""

  def __init__(self, blocks, attns, resample):
    self.block = nnx.List(blocks)
    self.attn = nnx.List(attns)
    self.resample = resample

  def run_blocks(self, h):
    for i, blk in enumerate(self.block):
      h = blk(h)
      if len(self.attn):
        h = self.attn[i](h)
    return h


class Mid(nnx.Module):

  def __init__(self, c: int, attention: bool, *, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(c, c, rngs=rngs)
    if attention:
      self.attn_1 = AttnBlock(c, rngs=rngs)
    self.block_2 = ResnetBlock(c, c, rngs=rngs)

  def __call__(self, h):
    h = self.block_1(h)
    if hasattr(self, "attn_1"):
      h = self.attn_1(h)
    return self.block_2(h)


class Encoder(nnx.Module):
  """Images (B, H, W, in) -> features (B, H / 2^(n-1), W / 2^(n-1), out)
  over n = len(ch_mult) levels; `attention` adds self-attention at the
  coarsest level and in the middle."""

  def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
               in_channels: int, out_channels: int, attention: bool, *,
               rngs: nnx.Rngs):
    mult, n = ch_mult, len(ch_mult)
    self.conv_in = conv(in_channels, ch, 3, rngs)
    levels, block_in = [], ch
    for i in range(n):
      block_out = ch * mult[i]
      blocks, attns = [], []
      for _ in range(num_res_blocks):
        blocks.append(ResnetBlock(block_in, block_out, rngs=rngs))
        block_in = block_out
        if attention and i == n - 1:
          attns.append(AttnBlock(block_in, rngs=rngs))
      down = Downsample(block_in, rngs=rngs) if i != n - 1 else None
      levels.append(Level(blocks, attns, down))
    self.down = nnx.List(levels)
    self.mid = Mid(block_in, attention, rngs=rngs)
    self.norm_out = group_norm(block_in, rngs)
    self.conv_out = conv(block_in, out_channels, 3, rngs)

  def __call__(self, x_BHWC):
    h = self.conv_in(x_BHWC)
    for level in self.down:
      h = level.run_blocks(h)
      if level.resample is not None:
        h = level.resample(h)
    h = self.mid(h)
    return self.conv_out(nnx.silu(self.norm_out(h)))


class Decoder(nnx.Module):
  """Features -> images, the encoder's mirror (one more res block per
  level; nearest-neighbour 2x upsampling before a convolution)."""

  def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
               in_channels: int, out_channels: int, attention: bool, *,
               rngs: nnx.Rngs):
    mult, n = ch_mult, len(ch_mult)
    block_in = ch * mult[-1]
    self.conv_in = conv(in_channels, block_in, 3, rngs)
    self.mid = Mid(block_in, attention, rngs=rngs)
    levels = [None] * n
    for i in reversed(range(n)):
      block_out = ch * mult[i]
      blocks, attns = [], []
      for _ in range(num_res_blocks + 1):
        blocks.append(ResnetBlock(block_in, block_out, rngs=rngs))
        block_in = block_out
        if attention and i == n - 1:
          attns.append(AttnBlock(block_in, rngs=rngs))
      up = Upsample(block_in, rngs=rngs) if i != 0 else None
      levels[i] = Level(blocks, attns, up)
    # Indexed by level like the official `up` list: up[0] is the finest.
    self.up = nnx.List(levels)
    self.norm_out = group_norm(block_in, rngs)
    self.conv_out = conv(block_in, out_channels, 3, rngs)

  def trunk(self, z_BhwC):
    """Everything but `conv_out`: its input features (B, H, W, ch).

    Tokenizer training takes the adversarial weight's gradients at
    `conv_out`, so it needs this split of the decoder.
    """
    h = self.mid(self.conv_in(z_BhwC))
    for level in reversed(list(self.up)):
      h = level.run_blocks(h)
      if level.resample is not None:
        h = level.resample(h)
    return nnx.silu(self.norm_out(h))

  def __call__(self, z_BhwC):
    return self.conv_out(self.trunk(z_BhwC))
