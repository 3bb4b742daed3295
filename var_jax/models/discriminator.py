"""PatchGAN discriminator (NHWC) and the VQGAN adversarial loss pieces.

The layout is taming-transformers' `NLayerDiscriminator`: 4x4 convolutions,
stride 2 for the first `n_layers`, then two stride-1 layers, LeakyReLU 0.2,
and batch normalisation after every convolution but the first and the last.
It outputs one logit per overlapping patch. The loss is the hinge loss, and
the generator's adversarial term is weighted adaptively by the ratio of the
reconstruction and adversarial gradient norms at the decoder's last layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_NEG_SLOPE = 0.2
_BN_EPS = 1e-5


class BatchStatNorm(nnx.Module):
  """BatchNorm as a GAN discriminator uses it: always the batch's statistics.

  The reference discriminator only ever runs in training mode, so running
  averages would never be read; none are kept.
  """

  def __init__(self, c: int, *, rngs: nnx.Rngs):
    self.scale = nnx.Param(1.0 + 0.02 * jax.random.normal(rngs.params(), (c,)))
    self.bias = nnx.Param(jnp.zeros((c,)))

  def __call__(self, x_BHWC):
    x = x_BHWC.astype(jnp.float32)
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean((x - mean) ** 2, axis=(0, 1, 2))  # Biased, as torch.
    y = (x - mean) * jax.lax.rsqrt(var + _BN_EPS)
    return (y * self.scale[...] + self.bias[...]).astype(x_BHWC.dtype)


def _conv(cin, cout, stride, bias, rngs):
  return nnx.Conv(cin, cout, (4, 4), strides=stride, padding=((1, 1), (1, 1)),
                  use_bias=bias, kernel_init=nnx.initializers.normal(0.02),
                  rngs=rngs)


class PatchGAN(nnx.Module):
  """Images (B, H, W, C) in [-1, 1] -> patch logits (B, h, w, 1)."""

  def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, *,
               rngs: nnx.Rngs):
    convs = [_conv(in_channels, ndf, 2, True, rngs)]
    norms = []
    mult = 1
    for n in range(1, n_layers + 1):
      prev, mult = mult, min(2 ** n, 8)
      stride = 2 if n < n_layers else 1
      convs.append(_conv(ndf * prev, ndf * mult, stride, False, rngs))
      norms.append(BatchStatNorm(ndf * mult, rngs=rngs))
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.out = _conv(ndf * mult, 1, 1, True, rngs)

  def __call__(self, x_BHWC):
    h = jax.nn.leaky_relu(self.convs[0](x_BHWC), _NEG_SLOPE)
    for conv, norm in zip(list(self.convs)[1:], self.norms):
      h = jax.nn.leaky_relu(norm(conv(h)), _NEG_SLOPE)
    return self.out(h)


def patch_grid(resolution: int, n_layers: int) -> int:
  """Side of the logit map for square inputs (<= 0: input too small)."""
  side = resolution
  for _ in range(n_layers):
    side = (side + 2 - 4) // 2 + 1
  return side - 2  # Two stride-1 4x4 convolutions with padding 1.


def hinge_d_loss(logits_real, logits_fake) -> jax.Array:
  """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def hinge_g_loss(logits_fake) -> jax.Array:
  """The generator's hinge term: -E[D(G(z))]."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def adaptive_weight(grad_nll, grad_gan, max_weight: float = 1e4) -> jax.Array:
  """VQGAN's lambda = |grad nll| / (|grad gan| + 1e-4), clipped, no gradient.

  Both gradients are taken at the decoder's last layer.
  """
  w = jnp.linalg.norm(grad_nll.reshape(-1)) / (
      jnp.linalg.norm(grad_gan.reshape(-1)) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))

