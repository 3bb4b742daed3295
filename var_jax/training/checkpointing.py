"""Run checkpoints: Orbax CheckpointManager over (state, run metadata).

Saves are asynchronous and atomic (Orbax writes a temporary directory and
renames it when complete), the newest `keep` are kept, and a restart resumes
from the newest complete one; half-written directories of a killed process
are ignored and cleaned up. The step saved is the number of completed
optimizer steps, which is also the data loader's next step.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from var_jax.errors import UserError
from var_jax.config import VQVAEConfig
from var_jax.models.vqvae import VQVAE
from var_jax.training import sharding

# Metadata that must match for a resumed run to continue the same run.
_RESUME_KEYS = ("global_batch", "seed", "total_steps", "model", "grad_accum")


class RunCheckpoints:
  """Periodic checkpoints of one training run under `workdir/checkpoints`."""

  def __init__(self, workdir, *, every: int, keep: int):
    self.dir = pathlib.Path(workdir).absolute() / "checkpoints"
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1,
        enable_async_checkpointing=True, cleanup_tmp_directories=True,
        create=True)
    self._mngr = ocp.CheckpointManager(self.dir, item_names=("state", "meta"),
                                       options=options)

  def latest_step(self) -> int | None:
    """Newest complete checkpoint's step, or None."""
    return self._mngr.latest_step()

  def restore(self, step: int, target, meta: dict):
    """State at `step`, placed per `target`'s shardings; checks metadata."""
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types; the user needs one line.
      msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise UserError(f"cannot resume from {self.dir}/{step}: "
                      f"{type(e).__name__}: {msg}") from None
    saved = out["meta"] or {}
    bad = [f"{k}: checkpoint {saved.get(k)!r}, now {meta.get(k)!r}"
           for k in _RESUME_KEYS if saved.get(k) != meta.get(k)]
    if bad:
      raise UserError(f"{self.dir} holds a different run ({'; '.join(bad)}); "
                      "use a new --workdir")
    return out["state"]

  def maybe_save(self, step: int, state, meta: dict, *,
                 force: bool = False) -> bool:
    """Starts an async save every `every` steps (or when forced)."""
    if not force and step % self.every:
      return False
    if self._mngr.latest_step() == step:
      return False
    return self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()


def restore_tree(path, target, what: str):
  """One Orbax tree of a model directory, placed per `target`'s shardings.

  `var_jax.checkpoint` restores onto one device; a sharded (and multi-
  process) run needs every array's destination named up front.
  """
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(pathlib.Path(path).absolute(), target)
  except Exception as e:  # Orbax raises many types; the user needs one line.
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise UserError(f"cannot restore {what} from {path}: "
                    f"{type(e).__name__}: {msg}") from None


def restore_vae(model_dir, cfg: VQVAEConfig, mesh):
  """The frozen tokenizer of a model directory, replicated on the mesh.

  Returns (graphdef, state as a nested dict, its shardings).
  """
  graphdef, abstract = nnx.split(
      nnx.eval_shape(lambda: VQVAE(cfg, rngs=nnx.Rngs(0))))
  pure = nnx.to_pure_dict(abstract)
  sh = jax.tree.map(lambda _: sharding.replicated(mesh), pure)
  target = sharding.with_shardings(pure, sh)
  return graphdef, restore_tree(pathlib.Path(model_dir) / "vae", target,
                                "the tokenizer"), sh


def export_model_dir(out, model_cfg, vae_state: dict, var_params: dict) -> None:
  """Writes a model directory (`var_jax.checkpoint` layout) from any mesh.

  Arrays are gathered to host numpy first: a tree saved with a mesh's
  shardings would only restore onto the same device topology, while model
  directories are meant to load anywhere. Every process takes part (Orbax
  synchronises them); `config.json` is written last, by process 0, so its
  presence marks a complete export.
  """
  vae_state, var_params = sharding.to_host((vae_state, var_params))
  from jax.experimental import multihost_utils
  out = pathlib.Path(out).absolute()
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)
  multihost_utils.sync_global_devices("var_jax_export_begin")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out / "vae", vae_state, force=True)
    if var_params is not None:  # None: a tokenizer-only directory.
      ckptr.save(out / "var", var_params, force=True)
    ckptr.wait_until_finished()
  multihost_utils.sync_global_devices("var_jax_export_end")
  if jax.process_index() == 0:
    tmp = out / ".config.json.tmp"
    tmp.write_text(model_cfg.to_json())
    tmp.rename(out / "config.json")
