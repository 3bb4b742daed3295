"""Infinity's scale schedules and its 2-D rotary position table.

A schedule is a list of (h, w) token grids, coarse to fine, for one aspect
ratio (h / w) and size: 256px takes the first 7 grids of the ratio's list,
512px 10, 1024px all 13. Positions for the rotary embedding are taken on the
ratio's finest 1024px grid ("normalised by h and w"): a token (i, j) of an
(h, w) grid sits at row round(i * H / h), column round(j * W / w) of the
final (H, W) grid, in float32 with ties to even, as the reference computes.
"""

from __future__ import annotations

import numpy as np

# Aspect ratio (h / w) -> the 13 grids of its 1024px schedule. Ratios below
# one are the transposes of those above.
_TALL = {
    1.0: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16),
          (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)),
    1.25: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16),
           (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15),
            (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)),
    1.5: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14),
          (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)),
    1.75: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12),
           (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)),
    2.0: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11),
          (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)),
    2.5: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10),
          (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)),
    3.0: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9),
          (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)),
}
# The wide ratios under the keys the reference gives them (1/r cut to 3
# decimals: 0.8, 0.75, 0.666, ...).
RATIOS = {r: g for r, g in _TALL.items()}
RATIOS.update({int(1 / r * 1000) / 1000: tuple((w, h) for h, w in g)
               for r, g in _TALL.items() if r != 1.0})
# Image side (square equivalent) -> how many grids of the list it samples.
SIZES = {256: 7, 512: 10, 1024: 13}
PATCH = 16  # Pixels per token side of the finest grid.


def nearest_ratio(h_div_w: float) -> float:
  """The listed aspect ratio nearest to `h_div_w` (as the reference snaps)."""
  keys = np.array(sorted(RATIOS))
  return float(keys[np.argmin(np.abs(keys - h_div_w))])


def schedule(ratio: float, size: int) -> tuple[tuple[int, int], ...]:
  """The (h, w) grids for a listed `ratio` at `size` (256, 512, 1024)."""
  return RATIOS[ratio][:SIZES[size]]


def image_size(grids) -> tuple[int, int]:
  """(height, width) in pixels of a schedule's finest grid."""
  h, w = grids[-1]
  return h * PATCH, w * PATCH


def level_ids(grids) -> np.ndarray:
  """(L,) scale index of every token, scales concatenated row-major."""
  return np.concatenate([np.full(h * w, i, np.int32)
                         for i, (h, w) in enumerate(grids)])


def rope_positions(ratio: float, grids) -> np.ndarray:
  """(L, 2) float32 (row, column) of every token of `grids` on the ratio's
  finest 1024px grid."""
  fh, fw = RATIOS[ratio][-1]
  out = []
  for h, w in grids:
    rows = np.round(np.arange(h, dtype=np.float32) * np.float32(fh / h))
    cols = np.round(np.arange(w, dtype=np.float32) * np.float32(fw / w))
    out.append(np.stack(np.meshgrid(rows, cols, indexing="ij"), -1)
               .reshape(-1, 2))
  return np.concatenate(out).astype(np.float32)


def rope_table(ratio: float, grids, head_dim: int,
               base: float = 10000.0) -> np.ndarray:
  """(2, L, head_dim // 2) float32: cos and sin of each token's angles.

  The first half of the angles turn with the row, the second with the
  column, each at `head_dim // 4` frequencies 1 / base^(2k / (head_dim/2)).
  """
  half = head_dim // 2
  inv = (1.0 / base ** (np.arange(0, half, 2, dtype=np.float32)
                        / np.float32(half))).astype(np.float32)
  pos = rope_positions(ratio, grids)
  ang = np.concatenate([pos[:, :1] * inv, pos[:, 1:] * inv], -1)
  return np.stack([np.cos(ang), np.sin(ang)]).astype(np.float32)
