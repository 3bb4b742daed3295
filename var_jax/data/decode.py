"""The one image reader of var-jax: a file as an image viewer shows it.

Every command that reads image files (`edit --image`, folder data for
`train`, `train-vae` and `tokenize`, `eval`) goes through `decode_image`:

* EXIF orientation is applied (a photo stored sideways with Orientation=6
  comes out upright, as viewers show it).
* 16-bit and 32-bit integer images are scaled to 8 bits over their full
  range (65535 -> 255), not clipped: a 16-bit gradient stays a gradient.
  32-bit float images are taken as [0, 1].
* Palette, CMYK, YCbCr, bilevel, gray and gray+alpha images become RGB.
* Transparency (an alpha channel, or a palette/colour-key transparency) is
  composited over a white background (`BACKGROUND`), as an image on a white
  page shows; the colour stored under fully transparent pixels never leaks.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

# Alpha is composited over this colour (white).
BACKGROUND = (255, 255, 255)
# Modes whose pixels carry alpha; palette/colour-key transparency is in info.
_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
# TIFF tags: bits per sample and sample format (1 unsigned, 2 signed, 3 float).
_TIFF_BITS, _TIFF_FORMAT = 258, 339


class CorruptImageError(Exception):
  """An image that cannot be decoded; data loaders skip and count it."""


def _full_scale_of_int32(img: Image.Image) -> int:
  """The value that means white in a mode "I" (int32) image.

  Pillow reads 16-bit PNG/PGM/TIFF data as "I" with 0..65535; only a TIFF
  that declares more than 16 bits per sample uses the 32-bit range.
  """
  if img.format == "TIFF":
    tags = getattr(img, "tag_v2", {})
    bits = tags.get(_TIFF_BITS, (16,))
    bits = int(bits[0] if isinstance(bits, tuple) else bits)
    fmt = tags.get(_TIFF_FORMAT, (1,))
    signed = int(fmt[0] if isinstance(fmt, tuple) else fmt) == 2
    if bits > 16:
      return 2**(bits - 1) - 1 if signed else 2**bits - 1
    return 2**bits - 1
  return 65535


def deep_full_scale(img: Image.Image) -> float | None:
  """White of a single-channel deep mode (I;16*, I, F); None for 8-bit.

  Read off the opened file (format and TIFF tags), before any transpose or
  copy drops them.
  """
  mode = img.mode
  if mode.startswith("I;16"):
    return 65535.0
  if mode == "I":
    return float(_full_scale_of_int32(img))
  if mode == "F":
    return 1.0
  return None


def _to_8bit(img: Image.Image, full: float | None) -> Image.Image:
  """A deep single-channel image -> mode "L", `full` mapping to 255."""
  if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
    return img
  if full is None:
    full = deep_full_scale(img)
  x = np.asarray(img, np.float64)
  x = np.clip(np.nan_to_num(x, nan=0.0) * (255.0 / full), 0.0, 255.0)
  return Image.fromarray(np.round(x).astype(np.uint8), mode="L")


def _has_alpha(img: Image.Image) -> bool:
  return img.mode in _ALPHA_MODES or "transparency" in img.info


def to_rgb(img: Image.Image, full: float | None = None) -> Image.Image:
  """Any PIL image -> RGB as shown on a white page (see module docstring).

  Args:
    img: any mode.
    full: the value that is white in a deep single-channel image (default:
      `deep_full_scale(img)`).

  Raises:
    CorruptImageError: a mode Pillow cannot bring to RGB (e.g. LAB).
  """
  try:
    img = _to_8bit(img, full)
    if _has_alpha(img):
      rgba = img.convert("RGBA")
      page = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
      return Image.alpha_composite(page, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")
  except (ValueError, OSError) as e:
    raise CorruptImageError(f"cannot convert mode {img.mode} to RGB: {e}"
                            ) from e


def _upright(img: Image.Image) -> Image.Image:
  """Applies the EXIF orientation; an unreadable EXIF block is ignored."""
  try:
    return ImageOps.exif_transpose(img)
  except (ValueError, OSError, TypeError, KeyError, SyntaxError):
    return img  # Viewers show the stored pixels when EXIF is broken.


def _from_array(arr: np.ndarray) -> Image.Image:
  """uint8/uint16/bool arrays (H, W), (H, W, 1|3|4) -> a PIL image."""
  arr = np.asarray(arr)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
    raise CorruptImageError(f"an image array must be (H, W) or (H, W, 1|3|4), "
                            f"got {arr.shape}")
  if arr.dtype == np.bool_:
    arr = arr.astype(np.uint8) * 255
  elif arr.dtype == np.uint16:
    arr = np.round(arr / 257.0).astype(np.uint8)
  elif arr.dtype != np.uint8:
    raise CorruptImageError(f"image arrays must be uint8 or uint16, got "
                            f"{arr.dtype}")
  mode = {2: "L", 3: "RGB", 4: "RGBA"}[arr.shape[-1] if arr.ndim == 3 else 2]
  return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


def _read_bytes(path) -> bytes:
  from var_jax.io import as_path  # Local: io imports nothing from data/.
  with as_path(path).open("rb") as fh:
    return fh.read()


def decode_image(data) -> Image.Image:
  """Reads one image as a viewer shows it; returns an RGB PIL image.

  Args:
    data: encoded bytes, a path (str, pathlib or epath; `gs://` works), or a
      uint8/uint16 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).

  Returns:
    An RGB `PIL.Image` (8 bits per channel), upright per EXIF, alpha
    composited over white.

  Raises:
    CorruptImageError: a missing, unreadable, truncated or unsupported file
      (Pillow raises many types; all become this one).
  """
  try:
    if isinstance(data, np.ndarray):
      return to_rgb(_from_array(data))
    if isinstance(data, (bytes, bytearray, memoryview)):
      raw = bytes(data)
    else:
      raw = _read_bytes(data if hasattr(data, "open") else os.fspath(data))
    img = Image.open(io.BytesIO(raw))
    img.load()  # Forces the full decode: a truncated file fails here.
    full = deep_full_scale(img)
    return to_rgb(_upright(img), full)
  except CorruptImageError:
    raise
  except (OSError, ValueError, SyntaxError, TypeError, EOFError,
          Image.DecompressionBombError) as e:
    if isinstance(e, Image.UnidentifiedImageError):
      raise CorruptImageError("not an image in a format Pillow reads") from e
    raise CorruptImageError(f"{type(e).__name__}: {e}") from e
