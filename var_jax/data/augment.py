"""Per-example image augmentation matching the official VAR `build_dataset`.

Official train aug: Resize(shorter side -> round(mid_reso * reso), LANCZOS),
RandomCrop(reso), optional RandomHorizontalFlip, ToTensor, x * 2 - 1. Val aug
swaps the random crop for a center crop and never flips. Everything here is
PIL + numpy and deterministic given a `np.random.Generator`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# The one image reader; re-exported here, where callers have always found it.
from var_jax.data.decode import CorruptImageError, decode_image  # noqa: F401

MID_RESO = 1.125


def mid_resolution(resolution: int, mid_reso: float = MID_RESO) -> int:
  """Shorter-side size before cropping, as in the official `round(1.125 * r)`."""
  return round(mid_reso * resolution)


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
  """Resizes so the shorter side is `size` (torchvision `Resize(int)` rule)."""
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  if short == size:
    return img
  # torchvision truncates the long side: int(size * long / short).
  new_long = int(size * long / short)
  new_wh = (size, new_long) if w <= h else (new_long, size)
  return img.resize(new_wh, Image.LANCZOS)


def random_crop_box(w: int, h: int, size: int,
                    rng: np.random.Generator) -> tuple[int, int]:
  """Top-left (top, left) of a uniform random `size` crop, bounds inclusive."""
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  return top, left


def center_crop_box(w: int, h: int, size: int) -> tuple[int, int]:
  """Top-left of the torchvision CenterCrop (Python round, i.e. half-to-even)."""
  return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def to_pm1(img_HWC: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] as ToTensor then x + x - 1 (bit-identical)."""
  x = img_HWC.astype(np.float32) / np.float32(255.0)
  return x + x - np.float32(1.0)


def augment(img: Image.Image, resolution: int, *, train: bool, hflip: bool,
            rng: np.random.Generator | None,
            mid_reso: float = MID_RESO) -> np.ndarray:
  """Official train/val augmentation of one RGB image.

  Args:
    img: RGB PIL image of any size.
    resolution: output side length.
    train: random crop (+ optional flip) if True, else center crop.
    hflip: horizontal flip with p=0.5 (train only).
    rng: source of the crop offset and flip coin (train only).
    mid_reso: shorter-side factor applied before cropping.

  Returns:
    float32 (resolution, resolution, 3) in [-1, 1].
  """
  img = resize_shorter(img, mid_resolution(resolution, mid_reso))
  w, h = img.size
  if train:
    top, left = random_crop_box(w, h, resolution, rng)
  else:
    top, left = center_crop_box(w, h, resolution)
  img_HWC = np.asarray(img)[top:top + resolution, left:left + resolution]
  # Official flips before resize/crop; flipping the crop instead is equal in
  # distribution (Lanczos is mirror-symmetric) and touches fewer pixels.
  if train and hflip and rng.random() < 0.5:
    img_HWC = img_HWC[:, ::-1]
  return to_pm1(img_HWC)


def digits_to_image(digit_HW: np.ndarray, resolution: int, *,
                    max_shift: int = 0,
                    rng: np.random.Generator | None = None) -> np.ndarray:
  """Upscales an 8x8 sklearn digit (0..16) to float32 (res, res, 3) in [-1, 1].

  Args:
    digit_HW: (8, 8) values in 0..16.
    resolution: output side length.
    max_shift: random translation of up to this many output pixels per axis,
      filled with the background (0); 0 disables it.
    rng: needed when max_shift > 0.
  """
  gray_HW = np.round(np.asarray(digit_HW, np.float64) * (255.0 / 16.0))
  img = Image.fromarray(gray_HW.astype(np.uint8))  # 2-D uint8 -> mode "L".
  img = img.resize((resolution, resolution), Image.LANCZOS)
  img_HW = np.asarray(img)
  if max_shift > 0:
    padded_HW = np.pad(img_HW, max_shift)
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=2)
    img_HW = padded_HW[dy:dy + resolution, dx:dx + resolution]
  return to_pm1(np.repeat(img_HW[..., None], 3, axis=-1))
