"""Sampling settings, checked once where they are made.

Pure Python (no JAX), so the command line checks its flags with the same
rules without importing the sampler.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Sequence

import numpy as np

from var_jax.errors import UserError
from var_jax.models.var.config import COMPUTE_DTYPES

SCALE_LOOPS = ("python", "scan")
LAYER_LOOPS = ("unrolled", "scan")
# Jobs of at most this many sampler calls get the scan loops from
# `loops_for`: their program compiles (or loads from the compilation cache)
# several times faster, which a short job feels more than the slower calls.
SCAN_MAX_CALLS = 8
# Seeds the sampler distinguishes: jax.random.key keeps 32 bits of a seed.
SEED_LIMIT = 2 ** 32


def loops_for(num_calls: int) -> tuple[str, str]:
  """(scale_loop, layer_loop) that finish a job of `num_calls` calls sooner.

  The scan loops for at most `SCAN_MAX_CALLS` calls (a short job is
  dominated by compiling or loading the program), the unrolled ones (the
  faster program per call) for longer jobs.
  """
  if num_calls <= SCAN_MAX_CALLS:
    return "scan", "scan"
  return "python", "unrolled"


def is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _per_scale(name, value, check):
  """A scalar or a sequence of values, each passed through `check`."""
  if isinstance(value, (str, bytes)):
    raise UserError(f"{name} must be a number or a list of numbers, got "
                    f"{value!r}")
  if isinstance(value, Sequence) or isinstance(value, np.ndarray):
    vals = tuple(check(name, v) for v in np.asarray(value).reshape(-1).tolist())
    if not vals:
      raise UserError(f"{name} must not be an empty list")
    return vals
  return check(name, value)


def check_top_k(name, v):
  if not is_int(v) or v < 0:
    raise UserError(f"{name} must be an integer >= 0 (0 = off), got {v!r}")
  return int(v)


def check_top_p(name, v):
  if not _is_real(v) or not 0 <= v <= 1:  # NaN fails the comparison too.
    raise UserError(f"{name} must be a number in [0, 1] (0 = off), got "
                    f"{v!r}")
  return float(v)


def check_cfg(name, v):
  if not _is_real(v) or not math.isfinite(v):
    raise UserError(f"{name} must be a finite number, got {v!r}")
  return float(v)


def check_seed_value(name, v):
  """An int seed in [0, 2**32) (jax.random.key keeps only 32 bits of an
  int, so larger or negative seeds would silently repeat others)."""
  if not is_int(v) or not 0 <= v < SEED_LIMIT:
    raise UserError(f"{name} must be an integer in [0, 2**32), got {v!r}")
  return int(v)


def check_temperature(name, v):
  if not _is_real(v) or not math.isfinite(v) or v <= 0:
    raise UserError(f"{name} must be a finite number > 0, got {v!r}")
  return float(v)


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """Sampling settings; each distinct static value compiles once.

  Attributes:
    cfg: classifier-free guidance scale (finite); scale si mixes
      `(1 + t) cond - t uncond` with `t = cfg * si / (K - 1)`. Data, not
      compiled in.
    top_k: keep the k most likely tokens (0 = off); one int for every
      scale or one per scale.
    top_p: nucleus mass in [0, 1] (0 = off); scalar or per scale.
    temperature: > 0, divides the logits after top-k/top-p filtering, just
      before the draw (CoDe's reference; the keep set is decided on the
      untempered logits); scalar or per scale. Data, not compiled in.
    cfg_until: from this scale index on (0..K), the null-class rows are
      dropped and the scales run B rows instead of 2B, i.e. without
      guidance. None (or K) keeps guidance to the end.
    draft_steps: collaborative decoding: the drafter draws scales
      0..N-1, the refiner the rest (1..K-1; needs `Sampler(drafter=...)`).
    more_smooth: Gumbel-softmax smoothing of the code vectors (for viewing,
      not for FID), as the official `more_smooth`.
    dtype: transformer matmul compute dtype, "float32" or "bfloat16".
    scale_loop: "python" (every scale its own exact-shape step) or "scan"
      (runs of similar scales in one `lax.scan`); see `loop`.
    layer_loop: "unrolled" (a Python loop over one buffer per layer) or
      "scan" (one `lax.scan` over the stacked layer weights).

  Raises:
    UserError: a value outside its domain, naming it.
  """

  cfg: float = 1.5
  top_k: int | tuple[int, ...] = 900
  top_p: float | tuple[float, ...] = 0.96
  temperature: float | tuple[float, ...] = 1.0
  cfg_until: int | None = None
  draft_steps: int | None = None
  more_smooth: bool = False
  dtype: str = "float32"
  scale_loop: str = "python"
  layer_loop: str = "unrolled"

  def __post_init__(self):
    for name, allowed in (("scale_loop", SCALE_LOOPS),
                          ("layer_loop", LAYER_LOOPS),
                          ("dtype", COMPUTE_DTYPES)):
      if getattr(self, name) not in allowed:
        raise UserError(f"{name} must be one of {allowed}, got "
                        f"{getattr(self, name)!r}")
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("cfg", check_cfg("cfg", self.cfg))
    set_("top_k", _per_scale("top_k", self.top_k, check_top_k))
    set_("top_p", _per_scale("top_p", self.top_p, check_top_p))
    set_("temperature", _per_scale("temperature", self.temperature,
                                   check_temperature))
    if self.cfg_until is not None and (not is_int(self.cfg_until)
                                       or self.cfg_until < 0):
      raise UserError(f"cfg_until must be a scale index >= 0, got "
                      f"{self.cfg_until!r}")
    if self.draft_steps is not None and (not is_int(self.draft_steps)
                                         or self.draft_steps < 1):
      raise UserError(f"draft_steps must be an integer >= 1, got "
                      f"{self.draft_steps!r}")
    if not isinstance(self.more_smooth, bool):
      raise UserError(f"more_smooth must be True or False, got "
                      f"{self.more_smooth!r}")

  def resolved(self, num_scales: int) -> "SampleOptions":
    """These options with every schedule spelled out for `num_scales` scales.

    top_k, top_p, temperature become K-tuples, cfg_until an int in [0, K].

    Raises:
      UserError: a per-scale list of another length, cfg_until > K, or
        draft_steps outside 1..K-1.
    """
    k = num_scales

    def spell(name):
      v = getattr(self, name)
      if not isinstance(v, tuple):
        return (v,) * k
      if len(v) != k:
        raise UserError(f"{name} has {len(v)} values but the model has {k} "
                        f"scales (give one value or one per scale)")
      return v

    until = k if self.cfg_until is None else self.cfg_until
    if until > k:
      raise UserError(f"cfg_until must be in [0, {k}] (the model has {k} "
                      f"scales), got {until}")
    if self.draft_steps is not None and not 1 <= self.draft_steps <= k - 1:
      raise UserError(f"draft_steps must be in [1, {k - 1}] (the model has "
                      f"{k} scales), got {self.draft_steps}")
    return dataclasses.replace(self, top_k=spell("top_k"),
                               top_p=spell("top_p"),
                               temperature=spell("temperature"),
                               cfg_until=until)
