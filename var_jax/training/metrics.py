"""Per-step metrics: a JSONL file, TensorBoard events and progress reports.

Only process 0 writes. Per-scale arrays (metric names starting `scale_`)
are flattened as `{name}_s{pn}` (pn = the scale's side in tokens), e.g.
`scale_loss` -> `loss_s16`. A non-finite loss or gradient norm stops the run
with `TrainingDiverged`.

Paths are `etils.epath` paths: a local workdir gets a line-buffered append
of `metrics.jsonl`; on cloud storage, which cannot append, the file is
rewritten whole (existing lines + new ones, atomically) at most every
`_REMOTE_FLUSH_S` seconds, at every `flush()` (the run calls it when it saves
a checkpoint, so the lines of every step up to the newest checkpoint survive
a kill) and at the end. TensorBoard events go through
tensorboardX, which writes `gs://` itself (google-cloud-storage).

A run that starts at step S (a resume, or a restart before the first
checkpoint: S = 0) first drops the lines of steps >= S from `metrics.jsonl`
(rewritten atomically) and opens TensorBoard with `purge_step=S`, so that
the steps it repeats appear once in both.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time

import numpy as np

from var_jax import io
from var_jax.errors import TrainingDiverged, WriteError

_CHECKED = ("loss", "grad_norm")
_REMOTE_FLUSH_S = 60.0


def flatten(metrics: dict, patch_nums) -> dict[str, float]:
  """Host metrics -> flat {name: float}; `scale_*` arrays become one per pn."""
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    if k.startswith("scale_"):
      for pn, x in zip(patch_nums, v.reshape(-1)):
        out[f"{k[len('scale_'):]}_s{pn}"] = float(x)
    else:
      out[k] = float(v)
  return out


def check_finite(step: int, flat: dict[str, float]) -> None:
  for name in _CHECKED:
    if name in flat and not math.isfinite(flat[name]):
      raise TrainingDiverged(f"non-finite {name} ({flat[name]}) at step "
                             f"{step}; lower the learning rate or check the "
                             "data")


def drop_steps_from(path, step: int) -> int:
  """Rewrites the JSONL log at `path` without the lines of steps >= `step`.

  A torn last line (a kill mid-write) is dropped too. The file is replaced
  atomically, and only when something is dropped. Returns the number of
  lines dropped (0 when the file does not exist).
  """
  path = io.as_path(path)
  if not path.exists():
    return 0
  lines = path.read_text().splitlines(True)
  kept = []
  for line in lines:
    if not line.endswith("\n"):
      continue  # Torn.
    try:
      s = json.loads(line).get("step")
    except (ValueError, AttributeError):
      kept.append(line)  # Not ours to judge.
      continue
    if not isinstance(s, int) or s < step:
      kept.append(line)
  if len(kept) != len(lines):
    io.write_text(path, "".join(kept))
  return len(lines) - len(kept)


@functools.cache
def _finite_fn():
  """jit: True when every float leaf of a tree is finite."""
  import jax
  import jax.numpy as jnp

  def finite(tree):
    ok = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(ok)) if ok else jnp.bool_(True)
  return jax.jit(finite)


def check_finite_state(step: int, state) -> None:
  """Refuses a state with a non-finite float anywhere (parameters, optimizer
  moments), as it stands after `step`: nothing such is saved or exported.

  Raises:
    TrainingDiverged: naming the step.
  """
  import jax
  if not bool(jax.device_get(_finite_fn()(state))):
    raise TrainingDiverged(f"non-finite parameters after step {step}; lower "
                           "the learning rate or check the data")


@contextlib.contextmanager
def _named_os_errors(path):
  """Turns an OSError into a one-line WriteError naming `path`."""
  try:
    yield
  except WriteError:
    raise
  except OSError as e:
    raise WriteError(io.describe_os_error(e, path)) from None


class _Jsonl:
  """Appends lines to a local file, or batches rewrites of a remote one."""

  def __init__(self, path):
    self.path = path
    self._local = io.is_local(path)
    if self._local:
      self._f = open(os.fspath(path), "a", buffering=1)
    else:
      self._lines = path.read_text().splitlines(True) if path.exists() else []
      self._dirty, self._last = False, time.monotonic()

  def write(self, line: str) -> None:
    if self._local:
      self._f.write(line)
      return
    self._lines.append(line)
    self._dirty = True
    if time.monotonic() - self._last > _REMOTE_FLUSH_S:
      self.flush()

  def flush(self) -> None:
    if not self._local and self._dirty:
      io.write_text(self.path, "".join(self._lines))
      self._dirty, self._last = False, time.monotonic()

  def close(self) -> None:
    if self._local:
      self._f.close()
    else:
      self.flush()


class MetricsWriter:
  """Appends one JSON object per logged step; mirrors it to TensorBoard.

  Raises:
    WriteError: the workdir, the log or the events cannot be written (full
      disk, permissions), naming the path and the cause.
  """

  def __init__(self, workdir, *, enabled: bool, total_steps: int,
               start_step: int, desc: str | None = None):
    self.enabled = enabled
    self._tb = self._bar = self._log = None
    if not enabled:
      return
    workdir = io.as_path(workdir)
    self.path = workdir / "metrics.jsonl"
    with _named_os_errors(self.path):
      workdir.mkdir(parents=True, exist_ok=True)
      # The steps from start_step on are run (again): their old lines go.
      drop_steps_from(self.path, start_step)
      self._log = _Jsonl(self.path)
      from tensorboardX import SummaryWriter  # Heavy import; writers only.
      tb = workdir / "tb"
      # purge_step: TensorBoard hides the earlier events of the steps
      # repeated from here (only needed when there are earlier events).
      purge = start_step if tb.exists() else None
      self._tb = SummaryWriter(logdir=os.fspath(tb), purge_step=purge)
    from var_jax.progress import progress_bar
    # A live bar on a terminal; whole report lines in a log file.
    self._bar = progress_bar(total_steps, initial=start_step, unit="step",
                             desc=desc, file=sys.stderr)

  def write(self, step: int, values: dict) -> None:
    """`values`: flat floats (or strings such as mfu 'n/a') for `step`."""
    if not self.enabled:
      return
    with _named_os_errors(self.path):
      self._log.write(json.dumps({"step": step, **values}) + "\n")
      for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"train/{k}", v, step)
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                            refresh=False)

  def flush(self) -> None:
    """Makes every line written so far durable (a remote log is rewritten).

    Raises:
      WriteError: the log or the events cannot be written.
    """
    if not self.enabled:
      return
    with _named_os_errors(self.path):
      self._log.flush()
      self._tb.flush()

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def note(self, msg: str) -> None:
    """A line for the user on stderr that does not break the progress bar."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(msg, file=sys.stderr)
    else:
      print(msg, file=sys.stderr, flush=True)

  def end_progress(self) -> None:
    """Closes the progress bar: later notes follow its last report."""
    if self._bar is not None:
      bar, self._bar = self._bar, None
      bar.close()

  def close(self) -> None:
    """Closes everything; the first write error (if any) is raised last."""
    self.end_progress()
    first = None
    for what in (self._tb, self._log):
      if what is None:
        continue
      try:
        with _named_os_errors(self.path):
          what.close()
      except WriteError as e:
        first = first or e
    self._tb = self._log = None
    if first is not None:
      raise first
