"""Official `.pth` (or `.safetensors`) checkpoints -> var-jax model
directories, without torch."""

from __future__ import annotations

import dataclasses

import numpy as np

from var_jax import checkpoint
from var_jax.models.var.config import (ModelConfig, check_compatible,
                                       get_preset)
from var_jax.convert.var import load
from var_jax.convert.weights import read_weights
from var_jax.io import as_path
from var_jax.convert.var.official_names import var_rules, vqvae_rules
from var_jax.models.abstract import abstract_split
from var_jax.models.var.transformer import VAR
from var_jax.models.var.vqvae import VQVAE

# Where nested training checkpoints keep each model (official `trainer`).
_NESTED = {"vae": ("vae_local", "vae"), "var": ("var_wo_ddp", "var", "model")}


def _is_tensor_dict(obj) -> bool:
  return isinstance(obj, dict) and bool(obj) and all(
      isinstance(v, np.ndarray) for v in obj.values())


def extract_state_dict(obj, kind: str, path) -> dict:
  """Finds the `kind` ('vae'/'var') state dict in a plain or nested checkpoint."""
  if _is_tensor_dict(obj):
    return obj
  if isinstance(obj, dict):
    for outer in ("trainer", "state_dict", "model", None):
      node = obj.get(outer) if outer else obj
      if _is_tensor_dict(node):
        return node
      if isinstance(node, dict):
        for name in _NESTED[kind]:
          if _is_tensor_dict(node.get(name)):
            return node[name]
  raise load.ConvertError(
      f"{path}: no {kind.upper()} state dict found (expected a plain state "
      f"dict or a training checkpoint with trainer.{_NESTED[kind][0]})")


def read_official(path, kind: str) -> dict:
  return load.strip_prefixes(extract_state_dict(read_weights(path), kind, path))


def infer_configs(vae_sd, var_sd, preset: str | None):
  """Configs read off the tensors, checked against `preset` when given."""
  var_cfg = load.infer_var_config(var_sd) if var_sd is not None else None
  patch_nums = var_cfg.patch_nums if var_cfg else None
  vae_cfg = (load.infer_vqvae_config(vae_sd, patch_nums)
             if vae_sd is not None else None)
  if preset is not None:
    want = get_preset(preset)
    if vae_cfg is not None:
      load.check_preset(want.vae, vae_cfg, "VQVAE")
      vae_cfg = dataclasses.replace(want.vae, v_patch_nums=vae_cfg.v_patch_nums)
    if var_cfg is not None:
      if want.var is None:
        raise load.ConvertError(f"preset {preset!r} has no VAR transformer")
      load.check_preset(want.var, var_cfg, "VAR")
      var_cfg = want.var
  check_compatible(vae_cfg, var_cfg)
  return vae_cfg, var_cfg


def official_states(vae_sd, var_sd, vae_cfg, var_cfg):
  """Pure-dict states (numpy) for each given model, via the mapping table."""
  vae_state = var_state = None
  if vae_sd is not None:
    abstract = abstract_split(VQVAE, vae_cfg)[1]
    vae_state = load.flat_to_pure(load.official_to_flat(
        abstract, vqvae_rules(vae_cfg), vae_sd, "VQVAE"))
  if var_sd is not None:
    abstract = abstract_split(VAR, var_cfg)[1]
    var_state = load.flat_to_pure(load.official_to_flat(
        abstract, var_rules(var_cfg), var_sd, "VAR", var_cfg.patch_nums))
  return vae_state, var_state


def convert_files(vae_path=None, var_path=None, out_dir=None,
                  preset: str | None = None, overwrite: bool = False,
                  log=print) -> ModelConfig:
  """Converts official checkpoints into a model directory, atomically.

  Args:
    vae_path, var_path: official `.pth` or `.safetensors` files (local or
      `gs://`); at least one.
    out_dir: model directory to write (None: only check and return config).
    preset: check the files against this preset's architecture.
    overwrite: replace an existing `out_dir`.
    log: progress lines.

  Raises:
    ConvertError, PthError: unreadable files or keys/shapes that do not fit.
    IncompatibleModelsError: a VAR that does not fit the VQVAE.
    CheckpointError: `out_dir` exists (checked before anything is read).
    WriteError: writing failed; nothing is left under `out_dir`.
  """
  if vae_path is None and var_path is None:
    raise load.ConvertError("nothing to convert: give --vae and/or --var")
  if preset is not None:
    get_preset(preset)  # An unknown name is refused before any reading.
  if out_dir is not None and as_path(out_dir).exists() and not overwrite:
    raise checkpoint.CheckpointError(
        f"{out_dir} already exists; pass --overwrite to replace it")
  vae_sd = var_sd = None
  if vae_path:
    log(f"reading {vae_path}")
    vae_sd = read_official(vae_path, "vae")
  if var_path:
    log(f"reading {var_path}")
    var_sd = read_official(var_path, "var")
  vae_cfg, var_cfg = infer_configs(vae_sd, var_sd, preset)
  vae_state, var_state = official_states(vae_sd, var_sd, vae_cfg, var_cfg)
  cfg = ModelConfig(name=preset or "converted", vae=vae_cfg, var=var_cfg)
  if out_dir is not None:
    log(f"writing {out_dir}")
    checkpoint.save_model(out_dir, cfg, vae_state, var_state,
                          overwrite=overwrite)
  return cfg
