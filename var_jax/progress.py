"""Progress reports on stderr: a live bar on a terminal, plain lines elsewhere.

A bar redrawn in place suits a terminal, but in a log file its frames pile
up behind carriage returns and run into the messages around them. So
`progress_bar` gives a tqdm bar only when its stream is a terminal; anywhere
else (a file, a pipe, a job scheduler's log) it gives a `PlainProgress`,
which writes one complete line per report: when the count crosses each
tenth of the total, at least every `every_s` seconds while it advances, and
at `close()` if anything happened since the last line.

Both kinds have the tqdm methods the commands use: `update`, `set_postfix`,
`write`, `close`, and use as a context manager.
"""

from __future__ import annotations

import math
import sys
import time


def _is_terminal(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError, OSError):  # No isatty, or closed.
    return False


def progress_bar(total: int, *, initial: int = 0, unit: str = "it",
                 desc: str | None = None, disable: bool = False, file=None,
                 every_s: float = 30.0, parts: int = 10):
  """A progress report for `total` items on `file` (default: stderr).

  Args:
    total: the count at which the work is complete.
    initial: the count already done (a resumed run).
    unit: what is counted ('step', 'img').
    desc: a label in front of each report.
    disable: report nothing (e.g. on all but one process).
    file: the stream; a terminal gets a tqdm bar, anything else plain lines.
    every_s, parts: plain lines only: at most `every_s` seconds apart while
      the count advances, and one whenever it crosses each 1/`parts` of the
      total.
  """
  file = sys.stderr if file is None else file
  if not disable and _is_terminal(file):
    from tqdm import tqdm  # Only a terminal needs the bar.
    return tqdm(total=total, initial=initial, unit=unit, desc=desc,
                file=file, dynamic_ncols=True)
  return PlainProgress(total, initial=initial, unit=unit, desc=desc,
                       file=file, every_s=every_s, parts=parts,
                       enabled=not disable)


def _duration(seconds: float) -> str:
  s = int(round(seconds))
  h, rest = divmod(s, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class PlainProgress:
  """Progress as whole lines, for streams that are not terminals.

  A line reads `desc: 30%| 120/400 step, 3.1 step/s, 0:39 elapsed, 1:30
  left, loss 1.2345`; nothing in it is ever redrawn.
  """

  def __init__(self, total: int, *, initial: int = 0, unit: str = "it",
               desc: str | None = None, file=None, every_s: float = 30.0,
               parts: int = 10, enabled: bool = True, clock=time.monotonic):
    self.total, self.n = int(total), int(initial)
    self.unit, self.desc = unit, desc
    self.file = sys.stderr if file is None else file
    self.enabled = enabled
    self._every_s, self._parts, self._clock = every_s, max(1, parts), clock
    self._t0 = self._last_t = clock()
    self._n0 = self._last_n = self.n
    self._postfix = ""
    self._closed = False
    self._next_mark = self._mark_after(self.n)

  def _mark_after(self, n: int) -> float:
    """The first count past `n` at a multiple of total / parts."""
    if self.total <= 0:
      return math.inf
    step = self.total / self._parts
    return (math.floor(n / step + 1e-9) + 1) * step

  def update(self, n: int = 1) -> None:
    self.n += n
    now = self._clock()
    if self.n >= self._next_mark - 1e-9 or now - self._last_t >= self._every_s:
      self._report(now)

  def set_postfix(self, refresh: bool = True, **values) -> None:
    """Values appended to each following line ('loss 1.2345')."""
    del refresh
    self._postfix = ", ".join(f"{k} {v}" for k, v in values.items())

  def refresh(self) -> None:
    """Nothing to redraw: lines are written as reports fall due."""

  def write(self, msg: str, file=None) -> None:
    """A message line (never mixed into a report line)."""
    if self.enabled:
      out = self.file if file is None else file
      out.write(msg + "\n")
      out.flush()

  def line(self, now: float | None = None) -> str:
    """The report line for the current count."""
    now = self._clock() if now is None else now
    elapsed = max(now - self._t0, 0.0)
    parts = [f"{self.n}/{self.total} {self.unit}"]
    if self.total > 0:  # 'NN%|' as in tqdm's lines, which tools look for.
      parts[0] = f"{100 * self.n / self.total:.0f}%| {parts[0]}"
    done = self.n - self._n0
    if done > 0 and elapsed > 0:
      rate = done / elapsed
      parts.append(f"{rate:.3g} {self.unit}/s")
      parts.append(f"{_duration(elapsed)} elapsed")
      if 0 < self.n < self.total:
        parts.append(f"{_duration((self.total - self.n) / rate)} left")
    if self._postfix:
      parts.append(self._postfix)
    head = f"{self.desc}: " if self.desc else ""
    return head + ", ".join(parts)

  def _report(self, now: float) -> None:
    self._last_t, self._last_n = now, self.n
    self._next_mark = self._mark_after(self.n)
    if self.enabled:
      self.write(self.line(now))

  def close(self) -> None:
    """Writes a last line if the count moved since the previous one."""
    if self._closed:
      return
    self._closed = True
    if self.n != self._last_n:
      self._report(self._clock())

  def __enter__(self) -> "PlainProgress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
