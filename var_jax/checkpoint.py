"""Model checkpoints on disk: `config.json` plus an Orbax tree per model.

Layout of a model directory (what `var-jax convert` writes and `sample`,
`encode`, `edit` and `train` read):

  DIR/config.json   ModelConfig (tokenizer + optional transformer)
  DIR/vae/          Orbax StandardCheckpointer tree of the VQVAE state
  DIR/var/          same for the VAR transformer (absent for a tokenizer)

DIR may be local or `gs://...` (any `etils.epath` path), or, where a
directory is read, a model name (`api.model_dir`: digits, digits_refiner,
d16..d36). Writes go to a
temporary sibling directory that is renamed into place, so a crash or a full
disk never leaves a half-written DIR behind. Reads compare config.json with
the stored trees (parameter names and shapes) before restoring anything.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from var_jax import api
from var_jax.models.var.config import ModelConfig, check_compatible
from var_jax.errors import CheckpointError
from var_jax.io import as_path, atomic_dir, is_local, orbax_writes, write_text
from var_jax.models.abstract import abstract_split
from var_jax.models.var.transformer import VAR
from var_jax.models.var.vqvae import VQVAE

DEFAULT_MODEL = api.BUNDLED["digits"]
# The shipped refiner holds no tokenizer copy: it shares the digits one.
_REFINER = api.BUNDLED["digits_refiner"]
# Mismatching parameters named in one error before "... and N more".
_NAMED = 4


def save_tree(path: epath.Path, model) -> None:
  """One model's state (a module or its pure dict) as an Orbax tree."""
  tree = model if isinstance(model, dict) else nnx.state(model).to_pure_dict()
  with orbax_writes(path):
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, tree)
      ckptr.wait_until_finished()


def save_model(out_dir, cfg: ModelConfig, vae=None, var=None,
               overwrite: bool = False) -> epath.Path:
  """Writes a model directory atomically; returns its path.

  Args:
    out_dir: destination (local or `gs://`).
    cfg: the ModelConfig stored as config.json.
    vae, var: NNX modules or their nested pure-dict states (None: left out).
    overwrite: replace an existing `out_dir`.

  Raises:
    CheckpointError: `out_dir` exists and `overwrite` is False.
    WriteError: a write failed (e.g. no space left); nothing is left behind.
  """
  with atomic_dir(out_dir, overwrite) as tmp:
    write_text(tmp / "config.json", cfg.to_json())
    if vae is not None:
      save_tree(tmp / "vae", vae)
    if var is not None:
      save_tree(tmp / "var", var)
  return as_path(out_dir)


def _key(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _leaves(tree) -> dict[str, tuple]:
  """{dotted name: shape} of a tree of arrays or array metadata."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_key(p): tuple(getattr(leaf, "shape", ())) for p, leaf in flat}


def _listing(items) -> str:
  items = list(items)
  more = f" and {len(items) - _NAMED} more" if len(items) > _NAMED else ""
  return ", ".join(items[:_NAMED]) + more


def check_tree(path, stored: dict, wanted: dict, what: str) -> None:
  """Stored parameter shapes must be the ones config.json implies.

  Args:
    path: the tree's directory (for the message).
    stored, wanted: {dotted name: shape} of the stored tree and of the model
      config.json describes.
    what: 'VQVAE' or 'VAR'.

  Raises:
    CheckpointError: naming the differing, missing and unexpected parameters.
  """
  bad = [f"{k} stored {stored[k]} but config.json implies {wanted[k]}"
         for k in wanted if k in stored and stored[k] != wanted[k]]
  missing = [k for k in wanted if k not in stored]
  extra = [k for k in stored if k not in wanted]
  parts = []
  if bad:
    parts.append(f"{len(bad)} shape(s) differ: {_listing(bad)}")
  if missing:
    parts.append(f"{len(missing)} parameter(s) missing: {_listing(missing)}")
  if extra:
    parts.append(f"{len(extra)} unexpected parameter(s): {_listing(extra)}")
  if parts:
    raise CheckpointError(
        f"{path} does not match the {what} in config.json ("
        + "; ".join(parts) + "): the directory mixes parts of different "
        "models; convert or train it again")


def restore_module(path: epath.Path, ctor, cfg, what: str):
  """`ctor(cfg)` with the Orbax tree at `path`, checked against it first.

  Raises:
    CheckpointError: the tree does not match the model `cfg` describes, or
      cannot be read (one line).
  """
  try:
    graphdef, state = abstract_split(ctor, cfg)
  except (ValueError, TypeError, ZeroDivisionError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointError(f"{path.parent}/config.json describes a {what} that "
                          f"cannot be built: {msg}") from None
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
      state.to_pure_dict())
  where = path.absolute() if is_local(path) else path
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(where)
      meta = getattr(meta, "item_metadata", meta)
      check_tree(path, _leaves(meta), _leaves(target), what)
      restored = ckptr.restore(where, target)
  except CheckpointError:
    raise
  except Exception as e:  # Orbax raises many types; the user needs one line.
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointError(f"cannot restore {path}: {msg}") from None
  # Orbax gives host (numpy) arrays for a target without shardings; on the
  # device once here, not copied there again by every jitted call.
  nnx.replace_by_pure_dict(state, jax.device_put(restored))
  return nnx.merge(graphdef, state)


def model_dir(ckpt_dir):
  """The directory of a model path or name (None: the bundled digits model);
  see `api.model_dir`, which may download a released model once."""
  return api.model_dir(ckpt_dir)


def _tokenizer_dir(d: epath.Path) -> epath.Path:
  """Where the VQVAE weights of model directory `d` are stored."""
  return as_path(DEFAULT_MODEL) if os.fspath(d) == os.fspath(_REFINER) else d


# Files up to this size are hashed whole (config.json, Orbax's metadata and
# manifests); larger ones (the arrays) by size and modification time.
_HASHED_MAX = 1 << 16


def _file_records(root: epath.Path) -> list:
  """[path under `root`, size, mtime, sha256 of a small file's bytes or
  None] of every file under `root`."""
  records, todo = [], [root]
  while todo:
    for p in sorted(todo.pop().iterdir()):
      if p.is_dir():
        todo.append(p)
        continue
      st = p.stat()
      rel = os.fspath(p)[len(os.fspath(root)):].lstrip("/")
      digest = (hashlib.sha256(p.read_bytes()).hexdigest()
                if st.length <= _HASHED_MAX else None)
      records.append([rel, st.length, st.mtime, digest])
  return sorted(records)


def fingerprint(ckpt_dir=None) -> str:
  """What identifies a model directory's contents, as `sha256:` + 16 hex.

  Covers config.json and every file of the directory (and of the bundled
  tokenizer a transformer-only directory uses): its path, size and
  modification time, and the content of files up to 64 KiB (config.json,
  Orbax's metadata and manifests). A directory replaced under the same name
  (converted or trained again, copied over) gets another fingerprint; a
  renamed or moved one keeps it.

  Raises:
    CheckpointError: no such model directory or name.
  """
  d = model_dir(ckpt_dir)
  dirs = [d] + ([_tokenizer_dir(d)] if _tokenizer_dir(d) != d else [])
  try:
    records = [_file_records(x) for x in dirs]
  except OSError as e:
    raise CheckpointError(f"cannot read {d}: {e.strerror or e}") from None
  text = json.dumps(records, sort_keys=True)
  return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def load_config(ckpt_dir) -> ModelConfig:
  """Reads and checks DIR/config.json (DIR: a path or a model name).

  Raises:
    CheckpointError: no config.json, unreadable or invalid JSON.
    IncompatibleModelsError: a transformer that does not fit the tokenizer
      (`check_compatible`).
  """
  d = model_dir(ckpt_dir)
  f = d / "config.json"
  try:
    text = f.read_text() if f.is_file() else None
  except OSError as e:
    raise CheckpointError(f"cannot read {f}: {e.strerror or e}") from None
  if text is None:
    if isinstance(ckpt_dir, str) and "/" not in ckpt_dir and (
        os.sep not in ckpt_dir):  # A bare word: most likely a name's typo.
      raise CheckpointError(
          f"{ckpt_dir} is not a var-jax model directory (no config.json) "
          f"nor a model name ({', '.join(api.model_names())}; `var-jax "
          "list`)")
    # Named as typed (a Path drops a leading "./").
    shown = ckpt_dir if isinstance(ckpt_dir, str) else d
    raise CheckpointError(f"{shown} is not a var-jax model directory "
                          "(no config.json); create one with `var-jax "
                          "convert`, or name a model (`var-jax list`)")
  try:
    cfg = ModelConfig.from_json(text)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f"{f} is invalid: {e}") from None
  check_compatible(cfg.vae, cfg.var, where=str(f))
  return cfg


def load_model(ckpt_dir=None, need_var: bool = True):
  """Returns (ModelConfig, VQVAE, VAR or None); None loads the bundled model.

  Args:
    ckpt_dir: model directory, local or `gs://`, or a model name (None:
      the bundled digits model; see `model_dir`). The bundled
      digits_refiner comes with the digits tokenizer.
    need_var: refuse a directory without a transformer.

  Raises:
    CheckpointError: missing or invalid parts, or stored parameters whose
      names or shapes differ from what config.json describes (each named).
    DownloadError, WriteError: fetching a released model failed.
  """
  d = model_dir(ckpt_dir)
  # A path given as text is passed on as typed, for load_config's errors.
  cfg = load_config(ckpt_dir if isinstance(ckpt_dir, str)
                    and as_path(ckpt_dir) == d else d)
  vae_dir = _tokenizer_dir(d)
  if cfg.vae is None or not (vae_dir / "vae").exists():
    raise CheckpointError(f"{d} has no VQVAE weights; convert it with --vae")
  if need_var and (cfg.var is None or not (d / "var").exists()):
    raise CheckpointError(f"{d} holds a tokenizer only; this command needs a "
                          "VAR transformer too (convert with --var)")
  vae = restore_module(vae_dir / "vae", VQVAE, cfg.vae, "VQVAE")
  var = None
  if cfg.var is not None and (d / "var").exists():
    var = restore_module(d / "var", VAR, cfg.var, "VAR")
  return cfg, vae, var


def load_var(ckpt_dir):
  """The VAR transformer of a model directory that may hold no tokenizer.

  For transformer-only directories such as the shipped `digits_refiner`
  (config.json + var/), whose tokenizer is another directory's.

  Raises:
    CheckpointError: no config.json, no transformer, or stored parameters
      that differ from what config.json describes.
  """
  d = model_dir(ckpt_dir)
  cfg = load_config(d)
  if cfg.var is None or not (d / "var").exists():
    raise CheckpointError(f"{d} holds no VAR transformer")
  return restore_module(d / "var", VAR, cfg.var, "VAR")


def bench_models(ckpt_dir, preset: str, random_var: bool = True):
  """(ModelConfig, VQVAE, VAR or None) for benchmarks.

  From `ckpt_dir` when given, else random weights of `preset`; the VAR is
  left out (None) of a random model unless `random_var`.
  """
  if ckpt_dir:
    return load_model(ckpt_dir, need_var=True)
  from var_jax.models.var.config import get_preset
  try:
    cfg = get_preset(preset)
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  if cfg.var is None:
    raise CheckpointError(f"preset {preset!r} has no VAR transformer")
  var = VAR(cfg.var, rngs=nnx.Rngs(1)) if random_var else None
  return cfg, VQVAE(cfg.vae, rngs=nnx.Rngs(0)), var
