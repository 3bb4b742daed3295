"""Per-step metrics: a JSONL file, TensorBoard events and a progress bar.

Only process 0 writes. Per-scale values are flattened as `loss_s{pn}` /
`acc_s{pn}` (pn = the scale's side in tokens). A non-finite loss or gradient
norm stops the run with `TrainingDiverged`.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np
from var_jax.errors import TrainingDiverged

_CHECKED = ("loss", "grad_norm")


def flatten(metrics: dict, patch_nums) -> dict[str, float]:
  """Host metrics -> flat {name: float}; per-scale arrays become one per pn."""
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    if k in ("scale_loss", "scale_acc"):
      prefix = "loss" if k == "scale_loss" else "acc"
      for pn, x in zip(patch_nums, v.reshape(-1)):
        out[f"{prefix}_s{pn}"] = float(x)
    else:
      out[k] = float(v)
  return out


def check_finite(step: int, flat: dict[str, float]) -> None:
  for name in _CHECKED:
    if name in flat and not math.isfinite(flat[name]):
      raise TrainingDiverged(f"non-finite {name} ({flat[name]}) at step "
                             f"{step}; lower the learning rate or check the "
                             "data")


class MetricsWriter:
  """Appends one JSON object per logged step; mirrors it to TensorBoard."""

  def __init__(self, workdir, *, enabled: bool, total_steps: int,
               start_step: int):
    self.enabled = enabled
    self._tb = self._bar = self._f = None
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self.path = workdir / "metrics.jsonl"
    self._f = open(self.path, "a", buffering=1)
    from tensorboardX import SummaryWriter  # Heavy import; writers only.
    self._tb = SummaryWriter(logdir=str(workdir / "tb"))
    from tqdm import tqdm
    # Without a terminal (log files) redraw rarely instead of every step.
    self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                     dynamic_ncols=True, file=sys.stderr,
                     mininterval=1.0 if sys.stderr.isatty() else 30.0)

  def write(self, step: int, values: dict) -> None:
    """`values`: flat floats (or strings such as mfu 'n/a') for `step`."""
    if not self.enabled:
      return
    self._f.write(json.dumps({"step": step, **values}) + "\n")
    for k, v in values.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(f"train/{k}", v, step)
    self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                          refresh=False)

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def note(self, msg: str) -> None:
    """A line for the user that does not break the progress bar."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(msg, file=sys.stderr)
    else:
      print(msg, file=sys.stderr)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._f is not None:
      self._f.close()
