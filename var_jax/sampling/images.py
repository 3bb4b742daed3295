"""Image files in and out of the sampling commands: grids, images, npz.

Images in the Python API are float32 (..., H, W, 3) in [0, 1]; `to_uint8`
turns them into the 8-bit pixels written to files, in the format the file
name's extension names (`IMAGE_FORMATS`).
"""

from __future__ import annotations

import os
import re

import numpy as np

from var_jax.errors import UserError
from var_jax.io import (as_path, atomic_file, reachable, save_npz,  # noqa: F401
                        save_png)  # (save_npz, save_png: re-exported)

# File name extension -> (Pillow format, save options). WebP is lossless:
# samples are written as drawn, as in a PNG.
IMAGE_FORMATS = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95}),
    ".jpeg": ("JPEG", {"quality": 95}),
    ".webp": ("WEBP", {"lossless": True}),
}


def to_uint8(images_BHWC) -> np.ndarray:
  """Floats in [0, 1] -> uint8, rounding as torchvision's save_image does."""
  x = np.asarray(images_BHWC, np.float32)
  return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


def grid(images_BHWC, ncol: int, pad: int = 2) -> np.ndarray:
  """uint8 (rows*H, ncol*W, 3) grid, row-major, padded with white; more
  columns than images make one row.

  Raises:
    UserError: `ncol` below 1.
  """
  if ncol < 1:
    raise UserError(f"ncol must be >= 1, got {ncol}")
  imgs = to_uint8(images_BHWC)
  b, h, w, c = imgs.shape
  ncol = min(ncol, b)
  nrow = -(-b // ncol)
  out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255,
                np.uint8)
  for i in range(b):
    r, q = divmod(i, ncol)
    y, x = pad + r * (h + pad), pad + q * (w + pad)
    out[y:y + h, x:x + w] = imgs[i]
  return out


def image_format(path, flag: str = "--out") -> str:
  """The Pillow format an output image's extension names (case-insensitive).

  Raises:
    UserError: an extension other than .png, .jpg, .jpeg or .webp, or .webp
      with a Pillow built without WebP.
  """
  ext = os.path.splitext(os.fspath(path))[1].lower()
  if ext not in IMAGE_FORMATS:
    what = f"{ext} is not an image format written here" if ext else (
        "no extension names the image format")
    raise UserError(f"{flag} {path}: {what}; end the name in .png, .jpg, "
                    ".jpeg or .webp")
  fmt = IMAGE_FORMATS[ext][0]
  if fmt == "WEBP":
    from PIL import features
    if not features.check("webp"):
      raise UserError(f"{flag} {path}: this Pillow cannot write WebP; use "
                      ".png or .jpg")
  return fmt


def save_image(path, image_HWC_u8: np.ndarray):
  """Writes uint8 (H, W, 3) in the format of `path`'s extension, atomically.

  Raises:
    UserError: an extension `image_format` refuses.
    WriteError: the write failed; nothing is left behind.
  """
  from PIL import Image
  fmt = image_format(path)
  opts = IMAGE_FORMATS[os.path.splitext(os.fspath(path))[1].lower()][1]
  img = Image.fromarray(np.asarray(image_HWC_u8, np.uint8))
  return atomic_file(path, lambda fh: img.save(fh, format=fmt, **opts))


def check_output_dir(path, flag: str = "--out-dir"):
  """Refuses an output folder that can never be written, before any work.

  Returns:
    The folder as an `epath.Path` (not created here).

  Raises:
    UserError: `path` or one of its parents is an existing file.
  """
  p = as_path(path)
  with reachable(p, flag):
    node = p
    while not node.exists() and node != node.parent:
      node = node.parent
    if node.exists() and not node.is_dir():
      where = "" if node == p else f": {node}"
      raise UserError(f"{flag} {path}{where} is a file, not a directory")
  return p


def check_unused_dir(path, flag: str = "--out-dir"):
  """Refuses an output folder that already holds files (samples of another
  run would mix with this one's), naming up to three of them.

  Raises:
    UserError: `path` is a folder that is not empty.
  """
  p = as_path(path)
  with reachable(p, flag):
    names = sorted(q.name for q in p.iterdir()) if p.is_dir() else []
  if names:
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    many = "file" if len(names) == 1 else "files"
    raise UserError(f"{flag} {path} is not empty ({len(names)} {many}: "
                    f"{shown}); give a new or empty folder, or --overwrite "
                    "to replace the samples there")


# What `sample_file_names` produces: index, label, seed.
_SAMPLE_NAME = re.compile(r"\d{5,}_label\d+_seed\d+\.png")


def is_sample_file_name(name: str) -> bool:
  """Whether `name` has the form `sample_file_names` gives (and `save_each`
  writes and, with overwrite, removes)."""
  return _SAMPLE_NAME.fullmatch(name) is not None


def sample_file_names(labels, seed: int, offset: int = 0) -> list[str]:
  """One PNG name per sample: index (from `offset`), label and seed, e.g.
  00003_label207_seed0.png; the index and the seed reproduce the sample."""
  width = max(5, len(str(offset + len(labels) - 1)))
  return [f"{offset + i:0{width}d}_label{int(c)}_seed{seed}.png"
          for i, c in enumerate(labels)]


def save_each(folder, images_BHWC, labels, seed: int, *,
              replace: bool = False) -> list:
  """Writes every image as its own PNG in `folder` (created), named by
  `sample_file_names`; returns the paths. Each file is written atomically.

  With `replace`, the PNGs in `folder` named as samples are
  (NNNNN_labelL_seedS.png, of any run) are removed first; other files stay.
  """
  d = as_path(folder)
  imgs = to_uint8(images_BHWC)
  if replace and d.is_dir():
    for old in d.iterdir():
      if _SAMPLE_NAME.fullmatch(old.name) and not old.is_dir():
        old.unlink()
  paths = [d / n for n in sample_file_names(labels, seed)]
  for p, img in zip(paths, imgs):
    save_image(p, img)
  return paths


def _read_u8(path, resolution: int) -> np.ndarray:
  """uint8 (res, res, 3): the image as a viewer shows it, resized and
  center-cropped (see `read_image`)."""
  from var_jax.data import augment, decode
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
  return np.asarray(img)[top:top + resolution, left:left + resolution]


def read_image(path, resolution: int) -> np.ndarray:
  """An image file -> float32 (res, res, 3) in [0, 1], what
  `zero_shot_edit` takes.

  Read by `var_jax.data.decode.decode_image`, as a viewer shows it: EXIF
  orientation applied, 16/32-bit images scaled to 8 bits, transparency
  composited over white. Then the shorter side is resized to `resolution`
  (Lanczos) and the center cropped, the official evaluation transform
  without the 1.125 margin, so that a box given in fractions refers to the
  whole visible picture. Pixels are 8-bit values / 255.

  Raises:
    UserError: no such file, or not a readable image.
  """
  return _read_u8(path, resolution).astype(np.float32) / np.float32(255)


def load_image(path, resolution: int) -> np.ndarray:
  """`read_image` in the tokenizer's input range: float32 in [-1, 1]
  (`data.augment.to_pm1`, as the training data pipeline scales pixels).

  Raises:
    UserError: no such file, or not a readable image.
  """
  from var_jax.data import augment
  return augment.to_pm1(_read_u8(path, resolution))
