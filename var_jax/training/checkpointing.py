"""Run checkpoints: Orbax CheckpointManager over (state, run record).

Saves are asynchronous and atomic (Orbax writes a temporary directory and
renames it when complete), the newest `keep` are kept, and a restart resumes
from the newest complete one; half-written directories of a killed process
are ignored and cleaned up. The step saved is the number of completed
optimizer steps, which is also the data loader's next step.

Each checkpoint carries the run's record (its config and model config); a
resume compares it with the new run's before any array is read and names
every field that differs. Nothing is created on disk before the first save,
so a run refused at start-up leaves no `checkpoints/` behind. Paths are
`etils.epath` paths (local or `gs://`), as Orbax takes them.
"""

from __future__ import annotations

import logging

import jax
import orbax.checkpoint as ocp
from flax import nnx

from var_jax import io
from var_jax.models.var.config import VQVAEConfig
from var_jax.errors import CheckpointError, WriteError
from var_jax.models.abstract import abstract_split
from var_jax.models.var.vqvae import VQVAE
from var_jax.training import sharding

_TMP_MARK = ".orbax-checkpoint-tmp"


def _dir(path):
  p = io.as_path(path)
  return p.absolute() if io.is_local(p) else p


def _first_line(e: BaseException) -> str:
  """'Type: first line of the message', without tensorstore's spec dump."""
  msg = str(e).strip().split(" [tensorstore_spec=")[0]
  return f"{type(e).__name__}: {msg.splitlines()[0]}" if msg else type(e).__name__


def write_error(e: BaseException, path) -> WriteError:
  """One-line WriteError for a failed write of `path` (cause named)."""
  if isinstance(e, WriteError):
    return e
  os_e = io.os_error_of(e)
  if os_e is not None:
    return WriteError(io.describe_os_error(os_e, path))
  return WriteError(f"cannot write {path}: {_first_line(e)}")


def _flat(d, prefix=""):
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def _short(v) -> str:
  r = repr(v)
  return r if len(r) <= 40 else r[:37] + "..."


def run_differences(saved: dict, now: dict, ignore=()) -> list[str]:
  """'field (checkpoint X, now Y)' for each differing leaf of two records.

  Fields are dotted paths ('config.global_batch', 'model.var.depth');
  `ignore` holds paths whose leaves (and sub-fields) are not compared.
  """
  a, b = _flat(saved), _flat(now)
  skip = lambda k: any(k == i or k.startswith(i + ".") for i in ignore)  # noqa: E731
  keys = [k for k in dict.fromkeys(list(a) + list(b)) if not skip(k)]
  return [f"{k} (checkpoint {_short(a.get(k))}, now {_short(b.get(k))})"
          for k in keys if a.get(k) != b.get(k)]


class RunCheckpoints:
  """Periodic checkpoints of one training run under `workdir/checkpoints`."""

  def __init__(self, workdir, *, every: int, keep: int):
    self.dir = _dir(workdir) / "checkpoints"
    self.every = every
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1,
        enable_async_checkpointing=True, cleanup_tmp_directories=True,
        create=True)
    try:
      self._mngr = self._open() if self.dir.exists() else None
    except OSError as e:  # E.g. a bucket that cannot be reached.
      raise CheckpointError(io.describe_os_error(e, self.dir, "reading")
                            ) from None

  def _open(self):
    return ocp.CheckpointManager(self.dir, item_names=("state", "meta"),
                                 options=self._options)

  def latest_step(self) -> int | None:
    """Newest complete checkpoint's step, or None."""
    return None if self._mngr is None else self._mngr.latest_step()

  def check_record(self, step: int, record: dict, ignore=()) -> dict:
    """Compares a checkpoint's run record with this run's, before restoring.

    Returns the stored record (for the checks the caller makes itself on
    fields in `ignore`).

    Raises:
      CheckpointError: naming every differing field (or why the record
        cannot be read).
    """
    try:
      saved = self._mngr.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"] or {}
    except Exception as e:  # Orbax raises many types; the user needs one line.
      raise CheckpointError(f"cannot read the run record of {self.dir}/{step}"
                            f": {_first_line(e)}") from None
    stored = saved
    if "config" not in saved:  # Older checkpoints: only the run length.
      saved = {"total_steps": saved.get("total_steps")}
      record = {"total_steps": record.get("total_steps")}
    diff = run_differences(saved, record, ignore)
    if diff:
      more = f" (+{len(diff) - 6} more)" if len(diff) > 6 else ""
      raise CheckpointError(
          f"{self.dir} holds another run; differing: {'; '.join(diff[:6])}"
          f"{more}. Resume with the config it started with, or use a new "
          "--workdir")
    return stored

  def restore(self, step: int, target):
    """State at `step`, placed per `target`'s shardings."""
    try:
      return self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:  # Orbax raises many types; the user needs one line.
      raise CheckpointError(f"cannot resume from {self.dir}/{step}: "
                            f"{_first_line(e)}") from None

  def due(self, step: int, *, force: bool = False) -> bool:
    """Whether `maybe_save(step, ...)` saves (unless `step` is saved)."""
    return force or step % self.every == 0

  def maybe_save(self, step: int, state, record: dict, *,
                 force: bool = False) -> bool:
    """Starts an async save every `every` steps (or when forced).

    Raises:
      WriteError: this or an earlier async save failed (full disk, ...).
    """
    if not self.due(step, force=force):
      return False
    try:
      with io.orbax_writes(self.dir):  # Quiets Orbax's thread echoes.
        if self._mngr is None:
          self._mngr = self._open()
        if self._mngr.latest_step() == step:
          return False
        return self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(record)), force=True)
    except Exception as e:
      raise self._failed(e) from None

  def wait(self) -> None:
    """Blocks until the running save is complete (WriteError if it failed)."""
    if self._mngr is None:
      return
    try:
      with io.orbax_writes(self.dir):
        self._mngr.wait_until_finished()
    except Exception as e:
      raise self._failed(e) from None

  def _failed(self, e: BaseException) -> WriteError:
    """Cleans up after a failed save; the complete checkpoints stay."""
    err = write_error(e, self.dir)
    self.close(quiet=True)
    self._remove_partial()
    return err

  def _remove_partial(self) -> None:
    """Removes Orbax's temporary directories (of saves that did not
    complete); call once no save of this run is under way."""
    try:
      for p in self.dir.iterdir():
        if _TMP_MARK in p.name:
          p.rmtree()
    except OSError:  # Orbax removes what is left when the run restarts.
      pass

  def close(self, quiet: bool = False) -> None:
    """Waits for the running save and releases Orbax's threads."""
    if self._mngr is None:
      return
    mngr, self._mngr = self._mngr, None
    if not quiet:
      try:
        mngr.close()
      except Exception as e:
        raise write_error(e, self.dir) from None
      return
    # After a failure: stop Orbax's threads without their error reports.
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
      mngr.close()
    except Exception:  # Already reported by the caller.
      pass
    finally:
      log.setLevel(level)
    # A save cut short (an interrupted one) leaves its temporary directory.
    # Its writers are stopped now. In a multi-process run another process
    # may still be writing there, and a gs:// workdir has no lock (another
    # run's save); Orbax removes what is left at the next start.
    if jax.process_count() == 1 and io.is_local(self.dir):
      self._remove_partial()


def restore_tree(path, target, what: str):
  """One Orbax tree of a model directory, placed per `target`'s shardings.

  `var_jax.checkpoint` restores onto one device; a sharded (and multi-
  process) run needs every array's destination named up front.
  """
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(_dir(path), target)
  except Exception as e:  # Orbax raises many types; the user needs one line.
    raise CheckpointError(f"cannot restore {what} from {path}: "
                          f"{_first_line(e)}") from None


def restore_vae(model_dir, cfg: VQVAEConfig, mesh):
  """The frozen tokenizer of a model directory, replicated on the mesh.

  Returns (graphdef, state as a nested dict, its shardings).
  """
  graphdef, abstract = abstract_split(VQVAE, cfg)
  pure = nnx.to_pure_dict(abstract)
  sh = jax.tree.map(lambda _: sharding.replicated(mesh), pure)
  target = sharding.with_shardings(pure, sh)
  return graphdef, restore_tree(_dir(model_dir) / "vae", target,
                                "the tokenizer"), sh


def export_model_dir(out, model_cfg, vae_state: dict, var_params: dict) -> None:
  """Writes a model directory (`var_jax.checkpoint` layout) from any mesh.

  Arrays are gathered to host numpy first: a tree saved with a mesh's
  shardings would only restore onto the same device topology, while model
  directories are meant to load anywhere. Every process takes part (Orbax
  synchronises them); `config.json` is written last, by process 0, so its
  presence marks a complete export.

  Raises:
    WriteError: naming the directory and the cause (full disk, ...).
  """
  vae_state, var_params = sharding.to_host((vae_state, var_params))
  from jax.experimental import multihost_utils
  out = _dir(out)
  try:
    if jax.process_index() == 0:
      out.mkdir(parents=True, exist_ok=True)
      if (out / "config.json").exists():
        (out / "config.json").unlink()
    multihost_utils.sync_global_devices("var_jax_export_begin")
    with io.orbax_writes(out), ocp.StandardCheckpointer() as ckptr:
      ckptr.save(out / "vae", vae_state, force=True)
      if var_params is not None:  # None: a tokenizer-only directory.
        ckptr.save(out / "var", var_params, force=True)
      ckptr.wait_until_finished()
  except WriteError:
    raise
  except Exception as e:
    raise write_error(e, out) from None
  multihost_utils.sync_global_devices("var_jax_export_end")
  if jax.process_index() == 0:
    io.write_text(out / "config.json", model_cfg.to_json())
