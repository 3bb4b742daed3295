"""LPIPS perceptual distance (VGG16 variant, v0.1): the network as math.

The weights are a pytree the caller passes in (`var_jax.convert.lpips` reads
them from the files a user names; `random_lpips_weights` makes stand-ins for
tests). The distance follows the reference: inputs in [-1, 1] are shifted and
scaled per channel, VGG16 features are taken after relu1_2, relu2_2,
relu3_3, relu4_3 and relu5_3, unit-normalised over channels, squared
differences are weighted per channel by the heads, averaged over space and
summed over the five layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# torchvision `features` indices of the 13 convolutions, and after which of
# them a feature map is taken (the ReLU that follows it) / a 2x2 max-pool runs.
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_TAPS = (2, 7, 14, 21, 28)
_POOL_BEFORE = (5, 10, 17, 24)
LAYER_CHANNELS = (64, 128, 256, 512, 512)
CONV_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512,
                 512)
# The reference ScalingLayer, for inputs in [-1, 1].
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
MIN_RESOLUTION = 16  # Four 2x2 pools before relu5_3.


def random_lpips_weights(seed: int = 0) -> dict:
  """He-initialised weights of the right shapes (tests and benchmarks only)."""
  rng = np.random.default_rng(seed)
  convs, cin = [], 3
  for cout in CONV_CHANNELS:
    std = np.sqrt(2.0 / (9 * cin))
    convs.append(((rng.standard_normal((3, 3, cin, cout)) * std).astype(
        np.float32), np.zeros((cout,), np.float32)))
    cin = cout
  lins = tuple(np.abs(rng.standard_normal((c,))).astype(np.float32) / c
               for c in LAYER_CHANNELS)
  return {"convs": tuple(convs), "lins": lins}


def _vgg_taps(convs, x_BHWC):
  """The five relu feature maps of VGG16."""
  taps, h = [], x_BHWC
  for i, (k, b) in zip(CONV_INDICES, convs):
    if i in _POOL_BEFORE:
      h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                (1, 2, 2, 1), "VALID")
    h = jax.lax.conv_general_dilated(
        h, k.astype(h.dtype), (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + b.astype(h.dtype))
    if i in _TAPS:
      taps.append(h)
  return taps


def lpips_distance(weights, x_BHWC, y_BHWC, dtype=jnp.float32) -> jax.Array:
  """Perceptual distance per image (B,) between images in [-1, 1]."""
  if min(x_BHWC.shape[1:3]) < MIN_RESOLUTION:
    raise ValueError(f"LPIPS needs images of at least {MIN_RESOLUTION}px, "
                     f"got {x_BHWC.shape[1]}x{x_BHWC.shape[2]}")
  b = x_BHWC.shape[0]
  both = jnp.concatenate([x_BHWC, y_BHWC]).astype(jnp.float32)
  both = ((both - _SHIFT) / _SCALE).astype(dtype)
  total = jnp.zeros((b,), jnp.float32)
  for f, w in zip(_vgg_taps(weights["convs"], both), weights["lins"]):
    f = f.astype(jnp.float32)
    f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
    d = (f[:b] - f[b:]) ** 2
    total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", d, w), axis=(1, 2))
  return total
