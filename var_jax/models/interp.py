"""Resampling that reproduces PyTorch's `F.interpolate` bit for bit (up to sum order).

Both primitives the quantizer needs are separable linear maps, so each is a
pair of small (out, in) matrices built with numpy at trace time and applied
with two einsums. Shapes are static per scale, which keeps everything jittable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST


def _cubic_weights(t: float, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution weights for taps at offsets -1, 0, 1, 2."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of PyTorch bicubic, align_corners=False, clamped border."""
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for o in range(n_out):
    # PyTorch does not clamp the source coordinate at 0 for cubic modes.
    src = (o + 0.5) * scale - 0.5
    i0 = int(np.floor(src))
    w = _cubic_weights(src - i0)
    for k in range(4):
      m[o, min(max(i0 - 1 + k, 0), n_in - 1)] += w[k]
  return m.astype(np.float32)


@functools.lru_cache(maxsize=None)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of adaptive average pooling (`mode='area'`)."""
  m = np.zeros((n_out, n_in), np.float64)
  for o in range(n_out):
    start = (o * n_in) // n_out
    end = -((-(o + 1) * n_in) // n_out)  # ceil
    m[o, start:end] = 1.0 / (end - start)
  return m.astype(np.float32)


@functools.lru_cache(maxsize=None)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of PyTorch (bi/tri)linear, align_corners=False,
  without antialiasing (also when shrinking)."""
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for o in range(n_out):
    src = max((o + 0.5) * scale - 0.5, 0.0)
    i0 = int(src)
    i1 = min(i0 + 1, n_in - 1)
    t = src - i0
    m[o, i0] += 1.0 - t
    m[o, i1] += t
  return m.astype(np.float32)


def _apply(x_BhwC: jax.Array, mh: np.ndarray, mw: np.ndarray) -> jax.Array:
  mh = jnp.asarray(mh, x_BhwC.dtype)
  mw = jnp.asarray(mw, x_BhwC.dtype)
  y = jnp.einsum("Hh,Bhwc->BHwc", mh, x_BhwC, precision=_HI)
  return jnp.einsum("Ww,BHwc->BHWc", mw, y, precision=_HI)


def _hw(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def bicubic_resize(x_BhwC: jax.Array, size) -> jax.Array:
  """Bicubic resize of an NHWC map to `size` (an int for a square, or
  (h, w)), as PyTorch computes it."""
  return _resize(x_BhwC, size, bicubic_matrix)


def area_resize(x_BHWC: jax.Array, size) -> jax.Array:
  """Area (adaptive average) downsample of an NHWC map to `size`."""
  return _resize(x_BHWC, size, area_matrix)


def bilinear_resize(x_BHWC: jax.Array, size) -> jax.Array:
  """Bilinear resize of an NHWC map to `size` without antialiasing, as
  PyTorch's `trilinear` computes it on one frame."""
  return _resize(x_BHWC, size, bilinear_matrix)


def _resize(x, size, matrix):
  _, h, w, _ = x.shape
  oh, ow = _hw(size)
  if (h, w) == (oh, ow):
    return x
  return _apply(x, matrix(h, oh), matrix(w, ow))
