"""Zero-shot inpainting, outpainting and class-conditional editing.

The official demo notebook samples as usual but, at every scale, replaces the
drawn code vectors by the given image's where an edit mask says "keep". The
mask lives on the last scale's grid and reaches each scale by bilinear
resizing thresholded at 0.5; the 1x1 scale always keeps the given token.
Because keeping happens per token before Phi and upsampling, the sampler
takes the given ids and the keep masks as per-scale lists.

Images go in and come out as float32 (B, H, W, 3) in [0, 1], the range of
every image in var-jax's Python API (the sampler's outputs, `read_image`);
8-bit pixels are divided by 255 first.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.errors import UserError
from var_jax.models.var import vqvae
from var_jax.models.scales import layout


def box_mask(size: int, box: Sequence[float], inpaint: bool) -> np.ndarray:
  """(size, size) float32 mask, 1 where the given image's tokens are kept.

  Args:
    size: the last scale's side.
    box: (y0, x0, y1, x1) as fractions of the side in [0, 1].
    inpaint: True regenerates inside the box (keeps outside), False keeps
      the inside and regenerates around it (outpainting).
  """
  y0, x0, y1, x1 = (float(v) for v in box)
  if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
    raise UserError(f"box (y0, x0, y1, x1) is fractions in [0, 1] of the "
                    f"image side and must satisfy 0 <= y0 < y1 <= 1 and "
                    f"0 <= x0 < x1 <= 1, got {tuple(box)}")
  m = np.zeros((size, size), np.float32)
  # Python's round (half to even), as the notebook's.
  m[round(y0 * size):round(y1 * size), round(x0 * size):round(x1 * size)] = 1
  return 1 - m if inpaint else m


def check_images(images_BHWC, side: int) -> np.ndarray:
  """`images_BHWC` as float32 (B, side, side, 3) in [0, 1].

  Raises:
    UserError: another shape, non-finite values, or values outside [0, 1];
      the hint fits the range found ([-1, 1] or 8-bit pixels).
  """
  images_BHWC = np.asarray(images_BHWC, np.float32)
  if images_BHWC.ndim != 4 or images_BHWC.shape[1:] != (side, side, 3):
    raise UserError(f"images must be (B, {side}, {side}, 3), got "
                    f"{tuple(images_BHWC.shape)}")
  if not np.isfinite(images_BHWC).all():
    raise UserError("images must be finite values in [0, 1]")
  low, high = float(images_BHWC.min()), float(images_BHWC.max())
  if low < 0 or high > 1:
    hint = ("map [-1, 1] images with (x + 1) / 2" if low < 0 and high <= 1
            else "divide 8-bit pixels by 255" if low >= 0
            else "scale them to [0, 1]")
    raise UserError(f"images must be floats in [0, 1], got values in "
                    f"[{low:g}, {high:g}]; {hint}")
  return images_BHWC


def _bilinear_axis(n_in: int, n_out: int):
  """Taps and weights of PyTorch's bilinear resize along one axis (float32)."""
  scale = np.float64(np.float32(n_in) / np.float32(n_out))
  # PyTorch's kernel rounds scale * (dst + 0.5) - 0.5 once (a fused
  # multiply-add), which float64 followed by one cast reproduces.
  src = (scale * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def scale_mask(mask_hw: np.ndarray, pn: int) -> np.ndarray:
  """(pn, pn) bool: the mask bilinearly resized to one scale, then > 0.5.

  Evaluated in float32 in PyTorch's order so that values landing near 0.5
  threshold the same way.
  """
  mask_hw = np.asarray(mask_hw, np.float32)
  if pn * pn <= 3:
    return np.ones((pn, pn), bool)
  h, w = mask_hw.shape
  hi0, hi1, hw0, hw1 = _bilinear_axis(h, pn)
  wi0, wi1, ww0, ww1 = _bilinear_axis(w, pn)
  row = lambda i: (ww0[None] * mask_hw[i][:, wi0] +
                   ww1[None] * mask_hw[i][:, wi1])
  out = hw0[:, None] * row(hi0) + hw1[:, None] * row(hi1)
  return out > 0.5


def keep_tokens(mask_hw: np.ndarray, patch_nums: Sequence[int]) -> np.ndarray:
  """(L,) bool over all scales' tokens in raster order, True = keep given.

  `layout(patch_nums).split` cuts it into the per-scale masks the sampler
  takes.
  """
  return np.concatenate([scale_mask(mask_hw, pn).reshape(-1)
                         for pn in patch_nums])


class EditOut(NamedTuple):
  drawn: list  # Ids the sampler drew per scale (B, pn*pn), as the notebook.
  idx: list  # The edited image's ids: given where kept, drawn elsewhere.
  images_BHWC: jax.Array  # float32 (B, H, W, 3) in [0, 1].
  mask_hw: np.ndarray  # The last-scale keep mask used.


def zero_shot_edit(sampler, vae, images_BHWC, mask_hw, labels=None, *,
                   seed=0, allow_null: bool = False) -> EditOut:
  """Edits images: keeps their tokens where `mask_hw` is 1, samples the rest.

  The official demo notebook's `autoregressive_infer_cfg` with
  `input_img_tokens` / `edit_mask` (demo_zero_shot_edit.ipynb).

  Args:
    sampler: a `Sampler` over (vae, var); its options (cfg, top-k, ...) apply.
    vae: the tokenizer that encodes `images_BHWC`.
    images_BHWC: float images (B, H, W, 3) in [0, 1] at the model's
      resolution (8-bit pixels / 255, e.g. `sampling.images.read_image`;
      anything outside [0, 1] is refused).
    mask_hw: (pn_K, pn_K) mask on the last scale's grid, 1 = keep (see
      `box_mask`).
    labels: class per image (or one for all) in [0, num_classes); None
      means unconditional (plain in/outpainting, the null class).
    seed: the sampling seed, an int in [0, 2**32).
    allow_null: accept the null class `num_classes` in `labels`.

  Returns:
    `EditOut`; images float32 (B, H, W, 3) in [0, 1], the input's range.

  Raises:
    UserError: a mask, image, label or seed that does not fit; images with
      values outside [0, 1] (e.g. 0-255 or [-1, 1] pixels), named.
  """
  patch_nums = sampler.patch_nums
  lay = layout(patch_nums)
  mask_hw = np.asarray(mask_hw, np.float32)
  if mask_hw.shape != (patch_nums[-1],) * 2:
    raise UserError(f"mask must be {(patch_nums[-1],) * 2} (the last scale),"
                    f" got {mask_hw.shape}")
  images_BHWC = check_images(images_BHWC, vae.cfg.downsample * patch_nums[-1])
  b = images_BHWC.shape[0]
  if labels is None:
    labels, allow_null = sampler.num_classes, True
  labels = np.asarray(labels)
  if labels.size == 1:
    labels = np.broadcast_to(labels.reshape(-1), (b,))
  labels = sampler.check_labels(labels, allow_null=allow_null)
  if labels.shape[0] != b:
    raise UserError(f"{labels.shape[0]} labels for {b} images")
  # The tokenizer takes [-1, 1], scaled as the data pipeline does
  # (`data.augment.to_pm1`): x + x - 1, bit for bit.
  given = vqvae.jit_tokenizer(vae, patch_nums)(
      images_BHWC + images_BHWC - np.float32(1))
  keep_L = keep_tokens(mask_hw, patch_nums)
  keep = [np.broadcast_to(k, (b, k.size)) for k in lay.split(keep_L[None])]
  out = sampler(labels, seed=seed, given=given, keep=keep,
                allow_null=allow_null)
  idx = [jnp.where(k, g, d) for g, d, k in zip(given, out.idx, keep)]
  return EditOut(out.idx, idx, out.images_BHWC, mask_hw)
