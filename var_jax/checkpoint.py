"""Model checkpoints on disk: `config.json` plus an Orbax tree per model.

Layout of a model directory (what `var-jax convert` writes and `sample`,
`encode`, `edit` and `train` read):

  DIR/config.json   ModelConfig (tokenizer + optional transformer)
  DIR/vae/          Orbax StandardCheckpointer tree of the VQVAE state
  DIR/var/          same for the VAR transformer (absent for a tokenizer)

Writes go to a temporary sibling directory that is renamed into place, so a
crash never leaves a half-written DIR behind.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from var_jax.config import ModelConfig
from var_jax.models.transformer import VAR
from var_jax.models.vqvae import VQVAE
from var_jax.errors import CheckpointError
from var_jax.io import atomic_dir, write_text

DEFAULT_MODEL = pathlib.Path(__file__).parent / "assets" / "digits"


def _save_tree(path: pathlib.Path, model) -> None:
  tree = model if isinstance(model, dict) else nnx.state(model).to_pure_dict()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
    ckptr.wait_until_finished()


def save_model(out_dir, cfg: ModelConfig, vae=None, var=None,
               overwrite: bool = False) -> pathlib.Path:
  """Writes a model directory atomically; returns its path.

  `vae` / `var` are NNX modules or their nested pure-dict states.
  """
  with atomic_dir(out_dir, overwrite) as tmp:
    write_text(tmp / "config.json", cfg.to_json())
    if vae is not None:
      _save_tree(tmp / "vae", vae)
    if var is not None:
      _save_tree(tmp / "var", var)
  return pathlib.Path(out_dir)


def _restore(path: pathlib.Path, ctor, cfg):
  abstract = nnx.eval_shape(lambda: ctor(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
      state.to_pure_dict())
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(path.absolute(), target)
  except Exception as e:  # Orbax raises many types; the user needs one line.
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointError(f"cannot restore {path}: {msg}") from None
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)


def load_config(ckpt_dir) -> ModelConfig:
  d = pathlib.Path(ckpt_dir)
  if not (d / "config.json").is_file():
    raise CheckpointError(f"{d} is not a var-jax model directory "
                          "(no config.json); create one with `var-jax convert`")
  try:
    return ModelConfig.from_json((d / "config.json").read_text())
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{d}/config.json is invalid: {e}") from None


def load_model(ckpt_dir=None, need_var: bool = True):
  """Returns (ModelConfig, VQVAE, VAR or None); None loads the bundled model."""
  d = pathlib.Path(ckpt_dir) if ckpt_dir is not None else DEFAULT_MODEL
  cfg = load_config(d)
  if cfg.vae is None or not (d / "vae").exists():
    raise CheckpointError(f"{d} has no VQVAE weights; convert it with --vae")
  vae = _restore(d / "vae", VQVAE, cfg.vae)
  var = None
  if cfg.var is not None and (d / "var").exists():
    var = _restore(d / "var", VAR, cfg.var)
  if need_var and var is None:
    raise CheckpointError(f"{d} holds a tokenizer only; this command needs a "
                          "VAR transformer too (convert with --var)")
  return cfg, vae, var


def bench_models(ckpt_dir, preset: str, random_var: bool = True):
  """(ModelConfig, VQVAE, VAR or None) for benchmarks.

  From `ckpt_dir` when given, else random weights of `preset`; the VAR is
  left out (None) of a random model unless `random_var`.
  """
  if ckpt_dir:
    return load_model(ckpt_dir, need_var=True)
  from var_jax.config import get_preset
  try:
    cfg = get_preset(preset)
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  if cfg.var is None:
    raise CheckpointError(f"preset {preset!r} has no VAR transformer")
  var = VAR(cfg.var, rngs=nnx.Rngs(1)) if random_var else None
  return cfg, VQVAE(cfg.vae, rngs=nnx.Rngs(0)), var
