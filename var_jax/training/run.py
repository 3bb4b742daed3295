"""The run skeleton both trainers plug into: data -> step -> metrics ->
checkpoints -> exported model directory.

A trainer supplies a `Task` (`trainer.VARTask`, `vae_trainer.VAETask`): its
model config, state spec and initial state, its jitted step, and what its
model directory holds. Everything else is here, once: config checks, the
mesh, the loaders (training, and the held-out split evaluated at the end),
resume (after comparing the stored run record with this run's), the step
loop with one step of metrics in flight, checkpoints, the stop on SIGINT or
SIGTERM (`interrupt`), export and closing.

Every input of a step is a function of (config, step): the loader is
deterministic per step, PRNG keys are fold_in(seed, step), learning rates
come from schedules. A run resumed from a checkpoint therefore repeats the
uninterrupted run exactly. Everything a run can check (config, weights,
data, the checkpoint's record) is checked before it writes anything.
"""

from __future__ import annotations

import json
import time

import jax

from var_jax import io, locks
from var_jax.errors import CheckpointError, DataError, TrainingDiverged
from var_jax.errors import UserError
from var_jax.training import data_identity
from var_jax.training import interrupt
from var_jax.training import mesh as mesh_lib
from var_jax.training import metrics as metrics_lib
from var_jax.training import sharding
from var_jax.training.checkpointing import RunCheckpoints, export_model_dir


# (what, config field, flag) of the batch a loader is opened with.
_TRAIN_BATCH = ("global batch", "global_batch", "--global-batch")
_EVAL_BATCH = ("eval batch", "eval_batch", "--eval-batch")
_EVAL_SPLIT = "(config eval_split, --eval-split; 'none' skips evaluation)"


def open_loader(cfg, resolution: int, *, split: str = "train",
                start_step: int = 0, global_batch: int | None = None,
                batch_names=_TRAIN_BATCH, **kw):
  """The data loader of a run config (this process's shard of each batch).

  Raises:
    DataError: as `make_loader`; a split smaller than the batch is named
      with the setting that chose the batch (`batch_names`: what, config
      field, flag).
  """
  from var_jax.data import make_loader  # Heavy (grain, PIL): import late.
  from var_jax.data.loader import SplitTooSmallError
  batch = global_batch or cfg.global_batch
  try:
    return make_loader(
        cfg.data, split=split, resolution=resolution, global_batch=batch,
        seed=cfg.seed, hflip=cfg.hflip, process_index=jax.process_index(),
        process_count=jax.process_count(), start_step=start_step,
        num_workers=cfg.data_workers, data_dir=cfg.tfds_data_dir,
        mid_reso=cfg.mid_reso, **kw)
  except SplitTooSmallError as e:
    what, field, flag = batch_names
    at = f" ({e.where})" if e.where is not None else ""
    raise DataError(f"{what} {batch} (config {field}, {flag}) exceeds the "
                    f"{e.examples} examples of {cfg.data} split {e.split!r}"
                    f"{at}") from None


def open_eval_loader(cfg, resolution: int, mesh, train_loader):
  """One pass over `cfg.eval_split` in `cfg.eval_batch` batches, or None.

  Opened before training starts, so that a missing split or a batch that
  does not fit fails before any step; every message names the config field
  and the flag to change.

  Raises:
    UserError: an eval batch the mesh or the processes cannot split.
    DataError: token-cache data (one split only), a missing split, a split
      smaller than one batch, or a split folder that is the training folder.
  """
  split, batch = cfg.eval_split, cfg.eval_batch
  if not split:
    return None
  if train_loader.yields_tokens:
    raise DataError(f"{cfg.data} is a token cache, which has one split: "
                    f"evaluating split {split!r} {_EVAL_SPLIT} needs image "
                    "data; pass --eval-split none")
  n = mesh.devices.size
  for parts, what in ((n, f"the {n} devices of mesh {dict(mesh.shape)}"),
                      (jax.process_count(),
                       f"the {jax.process_count()} processes")):
    if batch % parts:
      raise UserError(f"eval batch {batch} (config eval_batch, --eval-batch)"
                      f" is not divisible by {what}")
  from var_jax.data.sources import SplitMissingError, split_root
  root = getattr(train_loader.source, "root", None)  # Folder data only.
  try:
    if root is not None and split != "train":
      if str(split_root(cfg.data.partition(":")[2], split)) == str(root):
        raise DataError(
            f"eval split {split!r} {_EVAL_SPLIT} would read the training "
            f"images: {root} has class folders but no split folders; put "
            f"held-out images in {root}/val/<class>/ and training images in "
            f"{root}/train/<class>/, or pass --eval-split none")
    loader = open_loader(cfg, resolution, split=split, global_batch=batch,
                         batch_names=_EVAL_BATCH, shuffle=False, num_epochs=1)
  except SplitMissingError as e:
    raise DataError(f"eval split {split!r} {_EVAL_SPLIT}: {e}") from None
  return loader


class Task:
  """What a trainer plugs into `Run` (subclass it; defaults are no-ops).

  Attributes set by the subclass: `command` ('train', 'train-vae'),
  `model_cfg` (the exported `ModelConfig`), `patch_nums` (names per-scale
  metrics), `spec` (`state.StateSpec`), `batch_keys` (loader fields the step
  takes; may be set in `attach`).
  """

  command = ""

  def attach(self, loader, total: int) -> None:
    """Checks the opened data and builds the step (nothing written yet)."""

  def init_state(self) -> dict:
    """The state of a fresh run, in its shards."""
    raise NotImplementedError

  def step(self, state, batch: dict, step: int):
    """One optimizer step: (new state, device metrics)."""
    raise NotImplementedError

  def export_trees(self, state):
    """(tokenizer tree, VAR parameters or None) for the model directory."""
    raise NotImplementedError

  def describe(self) -> str:
    """Extra words for the start line (', 64px, lpips')."""
    return ""

  def warnings(self) -> list[str]:
    """Lines for the user after the start line (a layout that wastes
    memory); nothing by default."""
    return []

  def log_extras(self, step: int, dt: float, first: bool) -> dict:
    """Extra values for a logged step (MFU, progressive stage)."""
    del step, dt, first
    return {}

  def evaluate(self, state, note) -> dict:
    """Values measured after export, added to the last record."""
    del state, note
    return {}

  def close(self) -> None:
    """Releases what `attach` opened."""


class Run:
  """Builds and checks everything for one run; `run()` trains to the end.

  Args:
    cfg: a `RunConfig` (validated here).
    workdir: local path or `gs://...`; gets `checkpoints/`, `metrics.jsonl`,
      `tb/` and `model/`, but only once `run()` starts.
    make_task: `make_task(cfg, mesh)` -> the trainer's task.
    mesh_spec: the `--mesh` flag.
  """

  def __init__(self, cfg, workdir, make_task, *, mesh_spec: str | None = None):
    cfg.validate()
    self.cfg = cfg
    self.workdir = io.as_path(workdir)
    self.is_main = jax.process_index() == 0
    self.mesh = mesh_lib.make_mesh(mesh_spec)
    mesh_lib.check_batch(self.mesh, cfg.global_batch, cfg.accum_steps)
    self.task = make_task(cfg, self.mesh)
    self.loader = self.ckpts = None
    # One writer per workdir (process 0 of a local one; see `locks`): taken
    # before the checkpoints are opened (Orbax cleans up what it takes for
    # an unfinished save), released by `_close`.
    self.lock = locks.DirLock(self.workdir, what="--workdir",
                              flag="--workdir")
    try:
      if self.is_main:
        self.lock.acquire()
      self.ckpts = RunCheckpoints(self.workdir, every=cfg.ckpt_every,
                                  keep=cfg.keep_ckpts)
      self.start = self.ckpts.latest_step() or 0
      self.loader = open_loader(cfg, self.task.model_cfg.vae.resolution,
                                start_step=self.start)
      self.total = cfg.total_steps(self.loader.steps_per_epoch)
      if self.start > self.total:
        raise CheckpointError(f"{self.ckpts.dir} is at step {self.start}, "
                              f"past the run's {self.total} steps")
      self.task.attach(self.loader, self.total)
      self.record = {"command": self.task.command, "total_steps": self.total,
                     "model": json.loads(self.task.model_cfg.to_json()),
                     "config": cfg.record(),
                     "data": data_identity.identify(self.loader.source)}
      if self.start:
        ignore = (["config.model", "data"]
                  + [f"config.{f}" for f in cfg.RESUMABLE])
        saved = self.ckpts.check_record(self.start, self.record, ignore)
        diff = data_identity.differences(saved.get("data") or {},
                                         self.record["data"])
        if diff:
          raise DataError(
              f"{cfg.data} is not the data of the run in {self.ckpts.dir} "
              f"(step {self.start}): {'; '.join(diff)}; resume with the "
              "data it started with, or use a new --workdir")
        self.state = self.ckpts.restore(self.start, self.task.spec.target)
        # A checkpoint that holds a diverged state (saved by a version that
        # saved before checking) is refused, not trained on or exported.
        metrics_lib.check_finite_state(self.start - 1, self.state)
      else:
        self.state = self.task.init_state()
    except BaseException:
      self._close(None, quiet=True)
      raise

  def run(self) -> dict:
    """Trains from the resume point to the end; returns the last metrics.

    Raises:
      interrupt.TrainingInterrupted: SIGINT or SIGTERM stopped the run; the
        step finished when it arrived is saved (its metrics permitting) and
        everything is closed.
    """
    cfg, task = self.cfg, self.task
    writer = None
    try:
      writer = metrics_lib.MetricsWriter(
          self.workdir, enabled=self.is_main, total_steps=self.total,
          start_step=self.start, desc=task.command)
      writer.note(f"[{task.command}] {task.model_cfg.name}: steps "
                  f"{self.start}->{self.total}, global batch "
                  f"{cfg.global_batch}, mesh {dict(self.mesh.shape)}, "
                  f"{jax.process_count()} process(es), {cfg.dtype}"
                  f"{task.describe()}")
      for line in task.warnings():
        writer.note(f"[{task.command}] warning: {line}")
      last = self._loop(writer)
    except interrupt.TrainingInterrupted:
      self._close(writer, quiet=False)  # The line comes after the bar.
      raise
    except BaseException:
      self._close(writer, quiet=True)
      raise
    self._close(writer, quiet=False)
    return last

  def _loop(self, writer) -> dict:
    task = self.task
    pending, last = None, {}
    t_prev = time.perf_counter()
    stop = interrupt.StopOnSignal(
        task.command, process_count=jax.process_count(),
        key=f"var_jax_stop_{self.start}")
    with stop:
      for step in range(self.start, self.total):
        raw = next(self.loader)
        batch = sharding.put_batch({k: raw[k] for k in task.batch_keys},
                                   self.mesh)
        self.state, m = task.step(self.state, batch, step)
        # Read the previous step's metrics now: the device is already busy
        # with this one, so logging never stalls the pipeline.
        if pending is not None:
          self._write(writer, pending[0], self._checked(*pending[:2]),
                      *pending[2:])
        now = time.perf_counter()
        pending = (step, m, now - t_prev, step == self.start)
        t_prev = now
        final = step + 1 == self.total
        signum = stop.stop_after(step + 1, self.total)
        if signum is not None:
          self._stop(writer, stop, signum, step, pending)
        if final or self.ckpts.due(step + 1):
          # What is saved passed the checks: this step's metrics and the
          # state they produced (a diverged state is never saved).
          flat = self._checked(step, m)
          metrics_lib.check_finite_state(step, self.state)
          if not final:
            # A resume from this checkpoint never redoes the steps it
            # holds: their lines must be durable first (a remote log is
            # otherwise rewritten only every minute). The final step's line
            # waits for the evaluation after export, as in every run.
            self._write(writer, step, flat, *pending[2:])
            writer.flush()
            pending = None
        # A further signal waits for the save (no half-written checkpoint).
        with stop.saving():
          self.ckpts.maybe_save(step + 1, self.state, self.record,
                                force=final)
      with stop.saving():  # A signal meanwhile stops instead of exporting.
        self.ckpts.wait()
      signum = stop.stop_at_end()
      if signum is not None and self.start < self.total:
        self._stop(writer, stop, signum, self.total - 1, pending)
    if pending is not None:
      step, m, dt, first = pending
      last = self._checked(step, m)  # Never export a diverged model.
    # Also when nothing ran (a rerun after the last step was saved): the
    # restored state is checked as every saved one.
    metrics_lib.check_finite_state(self.total - 1, self.state)
    self.ckpts.wait()
    out = self.workdir / "model"
    export_model_dir(out, task.model_cfg, *task.export_trees(self.state))
    notes = []  # Printed after the progress bar's last report.
    last.update(task.evaluate(self.state, notes.append))
    if pending is not None:
      self._write(writer, step, last, dt, first)
    writer.end_progress()
    for line in notes:
      writer.note(line)
    writer.note(f"[{task.command}] done: {self.total} steps; model directory "
                f"{out}")
    return last

  def _stop(self, writer, stop, signum: int, step: int, pending) -> None:
    """Saves the state after `step` (its metrics permitting) and raises
    TrainingInterrupted saying what was saved and how to resume.

    A further signal quits at once (`interrupt.Interrupted`), except while
    a checkpoint is written: that one completes first."""
    done, name = step + 1, interrupt.signal_name(signum)
    try:
      if pending is not None:
        self._write(writer, pending[0], self._checked(*pending[:2]),
                    *pending[2:])
      metrics_lib.check_finite_state(step, self.state)
      writer.flush()
    except TrainingDiverged as e:
      with stop.saving(then_quit=False):
        self.ckpts.wait()  # A periodic save already under way completes.
      newest = self.ckpts.latest_step()
      kept = (f"the newest checkpoint is step {newest}" if newest else
              "no checkpoint was saved")
      raise interrupt.TrainingInterrupted(
          f"interrupted by {name}; step {done} not saved: {e}; {kept}",
          signum) from None
    with stop.saving(then_quit=False):  # TrainingInterrupted follows.
      self.ckpts.wait()  # Settles a save under way (maybe of this step).
      self.ckpts.maybe_save(done, self.state, self.record, force=True)
      self.ckpts.wait()
    nxt = ("resume from it" if done < self.total else
           "export the model directory")
    raise interrupt.TrainingInterrupted(
        f"interrupted by {name}: saved step {done}/{self.total} in "
        f"{self.ckpts.dir}; run the same command again to {nxt}", signum)

  def _checked(self, step: int, m) -> dict:
    flat = metrics_lib.flatten(jax.device_get(m), self.task.patch_nums)
    metrics_lib.check_finite(step, flat)
    return flat

  def _write(self, writer, step: int, flat: dict, dt: float, first: bool):
    if step % self.cfg.log_every == 0 or step + 1 == self.total:
      # The first step's time includes compilation: no throughput for it.
      flat.update(img_per_s=0.0 if first else self.cfg.global_batch / dt,
                  step_s=dt, **self.task.log_extras(step, dt, first))
      writer.write(step, flat)
    writer.advance()

  def _close(self, writer, *, quiet: bool) -> None:
    """Closes writer, loaders and checkpoints; raises the first error unless
    `quiet` (another error is already on its way)."""
    with interrupt.held():  # Never stopped halfway (see interrupt.held).
      self._close_all(writer, quiet=quiet)

  def _close_all(self, writer, *, quiet: bool) -> None:
    errors = []
    closers = [getattr(writer, "close", None),
               getattr(self.loader, "close", None), self.task.close,
               getattr(self.ckpts, "close", None) and (
                   lambda: self.ckpts.close(quiet=quiet)),
               self.lock.release]
    for close in closers:
      if close is None:
        continue
      try:
        close()
      except Exception as e:  # Keep closing the rest.
        errors.append(e)
    if errors and not quiet:
      raise errors[0]


def run(cfg, workdir, make_task, *, mesh_spec: str | None = None) -> dict:
  """Runs (or resumes) a run; returns the last step's metrics."""
  return Run(cfg, workdir, make_task, mesh_spec=mesh_spec).run()
