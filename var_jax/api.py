"""`var_jax.load`: a tokenizer and transformer by directory or name.

    m = var_jax.load()          # the bundled digits model (also "digits")
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

Every place that takes a model directory (`load`, `checkpoint.load_model`,
the commands' `--ckpt`) resolves names with `model_dir`: the bundled
`digits` and `digits_refiner`, and the released names. `catalog` lists
them, with the presets and bundled training configs, for `var-jax list`.

Heavy modules (JAX, Flax, Orbax) are imported by the calls, not by this
module, so `import var_jax` stays cheap.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import logging
import math
import os
import pathlib
from typing import Any, Callable

from etils import epath

from var_jax.caches import cache_root
from var_jax.convert.var.download import MODELS
from var_jax.errors import CheckpointError
from var_jax.io import as_path, is_local, reachable

MODELS_ENV = "VAR_JAX_MODELS"
_log = logging.getLogger(__name__)
# Models shipped inside the package, by the name `--ckpt` takes. The refiner
# holds a transformer only; its tokenizer is the digits model's.
_ASSETS = pathlib.Path(__file__).parent / "assets"
BUNDLED = {"digits": _ASSETS / "digits",
           "digits_refiner": _ASSETS / "digits_refiner"}


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


def model_names() -> tuple[str, ...]:
  """Every name `model_dir` resolves: the bundled, then the released ones."""
  return (*BUNDLED, *MODELS)


def model_dir(path_or_name=None, *, models_dir=None) -> epath.Path:
  """The model directory that a `--ckpt`-style argument names.

  Args:
    path_or_name: None or "digits" for the bundled digits model,
      "digits_refiner" for its shipped CoDe refiner (a transformer only),
      a released name "d16".."d36" (downloaded and converted once, see
      `released_model_dir`), or a directory, local or gs://. Only a `str`
      is read as a name: a directory called d16 is "./d16" or a Path.
    models_dir: where released models are kept (default
      `default_models_dir()`).

  Returns:
    The directory; one given as a path is returned unchecked.

  Raises:
    DownloadError, WriteError: fetching or keeping a released model failed.
  """
  if path_or_name is None:
    return as_path(BUNDLED["digits"])
  if isinstance(path_or_name, str) and path_or_name in BUNDLED:
    return as_path(BUNDLED[path_or_name])
  if isinstance(path_or_name, str) and path_or_name in MODELS:
    return released_model_dir(path_or_name, models_dir=models_dir)
  return as_path(path_or_name)


def load(path_or_name=None, *, models_dir=None) -> LoadedModel:
  """A model directory's tokenizer and transformer.

  Args:
    path_or_name: None or "digits" for the bundled digits model,
      "digits_refiner" for its refiner (with the digits tokenizer); a
      released model's name (the string "d16", ..., "d36"; downloaded and
      converted once, see `released_model_dir`); or a model directory,
      local or gs:// (written by `var-jax convert`, `download` or `train`).
      A directory that happens to be called d16 is loaded as "./d16".
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
  d = model_dir(path_or_name, models_dir=models_dir)
  with reachable(d, "model directory"):
    missing = not d.is_dir()
  if missing:
    raise CheckpointError(
        f"{os.fspath(path_or_name)}: no such model directory, and not a "
        f"released model ({', '.join(MODELS)}) or a bundled one "
        f"({', '.join(BUNDLED)})")
  cfg, vae, var = checkpoint.load_model(d, need_var=True)
  return LoadedModel(config=cfg, vae=vae, var=var, path=d)


# ------------------------------------------------------------ var-jax list
def _human(n: int) -> str:
  """A parameter count in three significant figures: 310M, 1.03B, 751K."""
  for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
    if n >= div:
      return f"{n / div:.3g}{unit}"
  return str(n)


@functools.lru_cache(maxsize=None)
def _count(kind: str, cfg) -> int:
  """Trainable parameters of a VQVAE or VAR config, from abstract shapes
  (nothing is allocated; a VQVAE takes about a second to trace)."""
  import jax
  from flax import nnx
  from var_jax.models.abstract import abstract_model
  from var_jax.models.var import transformer, vqvae
  ctor = vqvae.VQVAE if kind == "vae" else transformer.VAR
  model = abstract_model(ctor, cfg)
  return sum(math.prod(x.shape)
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def parameter_counts(config) -> tuple[int | None, int | None]:
  """(transformer, tokenizer) parameter counts of a `ModelConfig`; None for
  a part the config does not have."""
  var = _count("var", config.var) if config.var is not None else None
  vae = None
  if config.vae is not None:
    # The scale list shapes no tokenizer parameter: one trace serves every
    # preset of an architecture (256px and 512px share it).
    vae = _count("vae", dataclasses.replace(config.vae, v_patch_nums=(1,)))
  return var, vae


def _describe(config, *, tokenizer_of: str | None = None) -> str:
  """Sizes and shape of a model config in a few words."""
  var, vae = parameter_counts(config)
  if var is None:
    size = f"tokenizer only, {_human(vae)} parameters"
  elif tokenizer_of:
    size = f"VAR {_human(var)} parameters, with the {tokenizer_of} tokenizer"
  else:
    size = f"VAR {_human(var)} + tokenizer {_human(vae)} parameters"
  shape = f"{config.vae.resolution}px"
  if config.var is not None:
    shape += (f", {config.var.num_classes} classes, depth "
              f"{config.var.depth}")
  return f"{size}; {shape}"


def _training_configs() -> list[tuple[str, str]]:
  """(name, first docstring line) of the bundled `train_*` configs, read
  from their source (nothing is imported or run)."""
  spec = importlib.util.find_spec("var_jax.configs")
  out = []
  for folder in spec.submodule_search_locations or ():
    for f in sorted(pathlib.Path(folder).glob("train_*.py")):
      doc = ast.get_docstring(ast.parse(f.read_text())) or ""
      out.append((f.stem, doc.strip().splitlines()[0] if doc else ""))
  return out


def catalog(*, models_dir=None) -> list[tuple[str, list[tuple[str, str]]]]:
  """What `var-jax list` prints: (heading, [(name, description), ...]).

  The groups are the model presets, the bundled training configs, the
  bundled models and the released models (parameter counts from abstract
  shapes; a released model's download is the float32 `.pth` files of its
  transformer and tokenizer, and whether it is already kept locally).

  Args:
    models_dir: where released models are kept (default
      `default_models_dir()`); only looked at, never created.
  """
  from var_jax import checkpoint
  from var_jax.models.var.config import get_preset
  presets = importlib.import_module("var_jax.configs.models").PRESETS
  groups = [("model presets (convert / bench --preset; a training "
             "config's model)",
             [(name, _describe(cfg)) for name, cfg in presets.items()]),
            ("training configs (train / train-vae --config NAME; plan "
             "--preset NAME)",
             _training_configs())]
  bundled = []
  for name, path in BUNDLED.items():
    cfg = checkpoint.load_config(as_path(path))
    shared = (None if (path / "vae").exists() else "digits")
    bundled.append((name, _describe(cfg, tokenizer_of=shared)))
  groups.append(("bundled models (--ckpt NAME; shipped, no download)",
                 bundled))
  root = as_path(models_dir) if models_dir is not None else (
      default_models_dir())
  released = []
  for name in MODELS:
    cfg = get_preset(name)
    var, vae = parameter_counts(cfg)
    kept = (root / name / "config.json").exists() if is_local(root) else None
    where = {True: "; downloaded", False: "", None: ""}[kept]
    released.append((name, f"{_describe(cfg)}; download about "
                           f"{4 * (var + vae) / 1e9:.1f} GB{where}"))
  groups.append((f"released models (--ckpt NAME, var_jax.load(NAME); "
                 f"downloaded once into {root})", released))
  return groups
