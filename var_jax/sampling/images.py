"""Image files in and out of the sampling commands: grids, PNGs, npz."""

from __future__ import annotations

import numpy as np

from var_jax.errors import UserError
from var_jax.io import save_npz, save_png  # noqa: F401  (re-exported)


def to_uint8(images_BHWC) -> np.ndarray:
  """Floats in [0, 1] -> uint8, rounding as torchvision's save_image does."""
  x = np.asarray(images_BHWC, np.float32)
  return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


def grid(images_BHWC, ncol: int, pad: int = 2) -> np.ndarray:
  """uint8 (rows*H, ncol*W, 3) grid, row-major, padded with white."""
  imgs = to_uint8(images_BHWC)
  b, h, w, c = imgs.shape
  ncol = max(1, min(ncol, b))
  nrow = -(-b // ncol)
  out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255,
                np.uint8)
  for i in range(b):
    r, q = divmod(i, ncol)
    y, x = pad + r * (h + pad), pad + q * (w + pad)
    out[y:y + h, x:x + w] = imgs[i]
  return out


def load_image(path, resolution: int) -> np.ndarray:
  """An image file -> float32 (res, res, 3) in [-1, 1].

  Read by `var_jax.data.decode.decode_image`, as a viewer shows it: EXIF
  orientation applied, 16/32-bit images scaled to 8 bits, transparency
  composited over white. Then the shorter side is resized to `resolution`
  (Lanczos) and the center cropped, the official evaluation transform
  without the 1.125 margin, so that a box given in fractions refers to the
  whole visible picture.

  Raises:
    UserError: no such file, or not a readable image.
  """
  from var_jax.data import decode, augment
  from var_jax.io import as_path
  p = as_path(path)
  if not p.is_file():
    raise UserError(f"{path}: no such image file")
  try:
    img = decode.decode_image(p)
  except decode.CorruptImageError as e:
    raise UserError(f"{path}: not a readable image ({e})") from None
  img = augment.resize_shorter(img, resolution)
  w, h = img.size
  top, left = augment.center_crop_box(w, h, resolution)
  crop = np.asarray(img)[top:top + resolution, left:left + resolution]
  return augment.to_pm1(crop)
