"""Learning-rate and weight-decay annealing of the official VAR recipe.

Both are pure functions of the iteration, evaluated on the host in float64
(as the reference does) and fed to the jitted step as scalars, so a resumed
run sees exactly the values of an uninterrupted one.
"""

from __future__ import annotations

import math
from var_jax.errors import UserError

SCHEDULES = ("cos", "lin", "lin0", "lin00", "linT (T a float)", "exp")


def lr_ratio(sche: str, it: int, wp_it: float, max_it: int, wp0: float = 0.005,
             wpe: float = 0.001) -> float:
  """Multiplier of the peak lr at iteration `it` (linear warmup, then `sche`).

  Args:
    sche: 'cos', 'lin' (flat for 15%), 'lin0' (flat for 5%), 'lin00' (no flat
      part), 'lin<T>' (e.g. 'lin0.8', the progressive-training schedule) or
      'exp'.
    it: iteration, 0-based.
    wp_it: warmup iterations (rounded to an integer, as the reference does).
    max_it: total iterations; the ratio reaches `wpe` at max_it - 1.
    wp0: ratio at iteration 0.
    wpe: final ratio.
  """
  wp_it = round(wp_it)
  if it < wp_it:
    return wp0 + (1 - wp0) * it / wp_it
  pasd = (it - wp_it) / (max_it - 1 - wp_it)  # Progress after warmup, 0 -> 1.
  rest = 1 - pasd
  if sche == "cos":
    return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * pasd))
  if sche in ("lin", "lin0"):
    flat = 0.15 if sche == "lin" else 0.05
    return 1.0 if pasd < flat else wpe + (1 - wpe) * rest / (1 - flat)
  if sche == "lin00":
    return wpe + (1 - wpe) * rest
  if sche.startswith("lin"):
    try:
      flat = float(sche[3:])
    except ValueError:
      raise UserError(f"unknown schedule {sche!r}; choose from "
                       f"{', '.join(SCHEDULES)}") from None
    # Decays linearly to a midpoint during [0, T), then linearly to wpe.
    mid = (1 + wpe + (1 - wpe) * (1 - flat)) / 2
    if pasd < flat:
      return 1 + (mid - 1) * pasd / flat
    return wpe + (mid - wpe) * rest / (1 - flat)
  if sche == "exp":
    flat = 0.15
    if pasd < flat:
      return 1.0
    return math.exp((pasd - flat) / (1 - flat) * math.log(wpe))
  raise UserError(f"unknown schedule {sche!r}; choose from "
                   f"{', '.join(SCHEDULES)}")


def wd_at(it: int, max_it: int, wd: float, wd_end: float) -> float:
  """Cosine from `wd` at iteration 0 to `wd_end` at max_it - 1."""
  pasd = it / (max_it - 1)
  return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * pasd))


def lr_wd(sche: str, it: int, *, peak_lr: float, wd: float, wd_end: float,
          wp_it: float, max_it: int, wp0: float = 0.005,
          wpe: float = 0.001) -> tuple[float, float]:
  """(lr, wd) at iteration `it`; wd applies to the decayed group only."""
  ratio = lr_ratio(sche, it, wp_it, max_it, wp0=wp0, wpe=wpe)
  return ratio * peak_lr, wd_at(it, max_it, wd, wd_end)


def prog_stage(it: int, *, pg: float, pg0: int, wp_it: float, max_it: int,
               num_scales: int) -> int:
  """Progressive training: the last scale trained at `it`; -1 when off.

  Stays at `pg0` through warmup, grows linearly until `pg * max_it`, then
  trains every scale.
  """
  if not pg:
    return -1
  wp_it = round(wp_it)
  if it <= wp_it:
    return pg0
  if it >= max_it * pg:
    return num_scales - 1
  delta = num_scales - 1 - pg0
  progress = min(max((it - wp_it) / (max_it * pg - wp_it), 0), 1)
  return pg0 + round(progress * delta)


def prog_warmup(it: int, *, pg: float, pg0: int, wp_it: float, max_it: int,
                num_scales: int, prog_wp_it: float) -> float:
  """Weight ramp (0.01 -> 1) of the newest scale within a progressive stage.

  The reference keeps a counter of iterations since the stage began; the stage
  is monotone in `it`, so that counter is recomputed from `it` alone. The
  first stage of a run needs no ramp (the lr warmup covers it).
  """
  kw = dict(pg=pg, pg0=pg0, wp_it=wp_it, max_it=max_it, num_scales=num_scales)
  si = prog_stage(it, **kw)
  if si < 0 or si == prog_stage(0, **kw) or prog_wp_it <= 0:
    return 1.0
  lo, hi = 0, it  # Smallest iteration already in stage `si`.
  while lo < hi:
    mid = (lo + hi) // 2
    if prog_stage(mid, **kw) >= si:
      hi = mid
    else:
      lo = mid + 1
  its_in_stage = it - lo + 1
  return max(min(its_in_stage / prog_wp_it, 1), 0.01)
