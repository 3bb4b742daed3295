"""`var_jax.load`: a tokenizer and transformer by directory or released name.

    m = var_jax.load()          # the bundled digits model
    m = var_jax.load("d16")     # a released model, downloaded once
    m = var_jax.load("gs://bucket/run/model")
    out = var_jax.Sampler(m.vae, m.var, var_jax.SampleOptions())([1, 7])

Released models (`MODELS`: d16, d20, d24, d30, d36) are fetched from
huggingface.co/FoundationVision/var, converted, and kept as ordinary model
directories under `default_models_dir()`: `$VAR_JAX_MODELS` when set, else
`$XDG_CACHE_HOME/var-jax/models` (by default `~/.cache/var-jax/models`).
The `.pth` files stay in huggingface_hub's own cache. Nothing is written
anywhere unless a released name is asked for; a later `load` of the same
name reads the kept directory without any network access.

Heavy modules (JAX, Flax, Orbax) are imported by the calls, not by this
module, so `import var_jax` stays cheap.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

from etils import epath

from var_jax.caches import cache_root
from var_jax.convert.var.download import MODELS
from var_jax.errors import CheckpointError
from var_jax.io import as_path, reachable

MODELS_ENV = "VAR_JAX_MODELS"
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A tokenizer and a transformer that belong together, ready to sample.

  Attributes:
    config: the directory's `ModelConfig` (config.json).
    vae: the `VQVAE` (tokenizer and decoder).
    var: the `VAR` transformer.
    path: the model directory it was read from.
  """

  config: Any
  vae: Any
  var: Any
  path: epath.Path


def default_models_dir() -> epath.Path:
  """Where released models are kept: `$VAR_JAX_MODELS`, else
  `$XDG_CACHE_HOME/var-jax/models` (`~/.cache/var-jax/models`); not
  created here."""
  env = os.environ.get(MODELS_ENV, "").strip()
  return as_path(env or os.path.join(cache_root(), "models"))


def released_model_dir(name: str, *, models_dir=None,
                       fetch: Callable | None = None,
                       preset: str | None = None) -> epath.Path:
  """The model directory of released model `name`, made on first use.

  The first call downloads and converts (`convert.var.download.download`)
  into `models_dir/name`, atomically; later calls find it there.

  Args:
    name: d16, d20, d24, d30 or d36.
    models_dir: where converted models are kept (local or gs://; default
      `default_models_dir()`).
    fetch, preset: as `download` takes them (a fetch function returning
      local `.pth` paths; the preset the files must match, default `name`).

  Raises:
    DownloadError: an unknown name, or a fetch that failed.
    ConvertError, PthError: fetched files that are not the release's.
    WriteError: the directory could not be written.
  """
  from var_jax.convert.var import download as dl
  dl.checkpoint_files(name)  # An unknown name fails before any writing.
  root = as_path(models_dir) if models_dir is not None else (
      default_models_dir())
  out = root / name
  with reachable(out, "models directory"):
    if (out / "config.json").exists():
      return out
  try:
    dl.download(name, out, fetch=fetch, preset=preset, log=_log.info)
  except CheckpointError:
    # Another process may have finished the same download first.
    if not (out / "config.json").exists():
      raise
  return out


def load(path_or_name=None, *, models_dir=None) -> LoadedModel:
  """A model directory's tokenizer and transformer.

  Args:
    path_or_name: None for the bundled digits model; a released model's
      name (the string "d16", ..., "d36"; downloaded and converted once,
      see `released_model_dir`); or a model directory, local or gs://
      (written by `var-jax convert`, `download` or `train`). A directory
      that happens to be called d16 is loaded as "./d16".
    models_dir: where released models are kept (default
      `default_models_dir()`).

  Returns:
    A frozen `LoadedModel` with `.config`, `.vae`, `.var` and `.path`.

  Raises:
    CheckpointError: no such directory and no released name, a directory
      without a transformer, or stored weights that do not match
      config.json (named).
    IncompatibleModelsError: a transformer that does not fit the tokenizer.
    DownloadError, WriteError: fetching or keeping a released model failed.
  """
  from var_jax import checkpoint
  if path_or_name is None:
    d = as_path(checkpoint.DEFAULT_MODEL)
  elif isinstance(path_or_name, str) and path_or_name in MODELS:
    d = released_model_dir(path_or_name, models_dir=models_dir)
  else:
    d = as_path(path_or_name)
    with reachable(d, "model directory"):
      missing = not d.is_dir()
    if missing:
      raise CheckpointError(
          f"{os.fspath(path_or_name)}: no such model directory, and not a "
          f"released model ({', '.join(MODELS)})")
  cfg, vae, var = checkpoint.load_model(d, need_var=True)
  return LoadedModel(config=cfg, vae=vae, var=var, path=d)
