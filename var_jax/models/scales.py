"""The one scale layout: where each scale's tokens sit in the sequence.

VAR's sequence concatenates the token maps of the scales `patch_nums`
(1x1, 2x2, ..., 16x16 at 256px), row-major within a map. Scale `si` holds
positions `[starts[si], ends[si])`. Every part of var-jax (sampler, train
step, loss, editor, attention, converter) takes these tables from here.

Official counterparts: `VAR.begin_ends`, `VAR.L`, `VAR.first_l`, the `lvl_1L`
buffer (`level_ids`), and the per-scale slicing of `idx_Bl` lists.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class ScaleLayout:
  """Static per-scale tables of a scale list.

  Attributes:
    patch_nums: side of each scale's token map, coarse to fine, e.g.
      (1, 2, 3, 4, 5, 6, 8, 10, 13, 16).
  """

  patch_nums: tuple[int, ...]

  def __post_init__(self):
    object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))

  @property
  def num_scales(self) -> int:
    """K, the number of scales."""
    return len(self.patch_nums)

  @functools.cached_property
  def lengths(self) -> tuple[int, ...]:
    """pn * pn tokens per scale."""
    return tuple(p * p for p in self.patch_nums)

  @functools.cached_property
  def starts(self) -> tuple[int, ...]:
    """First sequence position of each scale."""
    return tuple(int(s) for s in np.cumsum((0,) + self.lengths[:-1]))

  @functools.cached_property
  def ends(self) -> tuple[int, ...]:
    """One past the last position of each scale."""
    return tuple(s + n for s, n in zip(self.starts, self.lengths))

  @property
  def begin_ends(self) -> tuple[tuple[int, int], ...]:
    """(start, end) per scale, the official `VAR.begin_ends`."""
    return tuple(zip(self.starts, self.ends))

  @property
  def seq_len(self) -> int:
    """L, the total token count (680 at 256px)."""
    return sum(self.lengths)

  @property
  def first_l(self) -> int:
    """Tokens of the first scale (the start-of-sequence block)."""
    return self.lengths[0]

  @property
  def lmax(self) -> int:
    """Token count of the largest scale."""
    return max(self.lengths)

  def level_ids(self) -> np.ndarray:
    """int32 (L,) scale index of each position (the official `lvl_1L`)."""
    return np.repeat(np.arange(self.num_scales, dtype=np.int32),
                     self.lengths)

  def split(self, a_BL, axis: int = 1) -> list:
    """Cuts a concatenated array (..., L, ...) into per-scale pieces.

    Works on numpy and jax arrays; returns `[a[:, start:end] for each scale]`
    along `axis`. None passes through as None.
    """
    if a_BL is None:
      return None
    if a_BL.shape[axis] != self.seq_len:
      raise ValueError(f"expected {self.seq_len} positions along axis {axis}, "
                       f"got shape {tuple(a_BL.shape)}")
    index = [slice(None)] * a_BL.ndim
    out = []
    for s, e in self.begin_ends:
      index[axis] = slice(s, e)
      out.append(a_BL[tuple(index)])
    return out

  def join(self, per_scale, axis: int = 1):
    """Inverse of `split`: per-scale (B, pn*pn, ...) pieces -> (B, L, ...)."""
    pieces = list(per_scale)
    if len(pieces) != self.num_scales:
      raise ValueError(f"expected {self.num_scales} scales, got {len(pieces)}")
    for si, (p, n) in enumerate(zip(pieces, self.lengths)):
      if p.shape[axis] != n:
        raise ValueError(f"scale {si} needs {n} positions along axis {axis}, "
                         f"got shape {tuple(p.shape)}")
    if all(isinstance(p, np.ndarray) for p in pieces):
      return np.concatenate(pieces, axis=axis)
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    return jnp.concatenate([jnp.asarray(p) for p in pieces], axis=axis)


@functools.lru_cache(maxsize=None)
def layout(patch_nums) -> ScaleLayout:
  """The (cached) `ScaleLayout` of `patch_nums`."""
  return ScaleLayout(tuple(patch_nums))
