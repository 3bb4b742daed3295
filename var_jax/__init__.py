"""var-jax: VAR (next-scale prediction) in JAX and Flax NNX.

The public names, each imported on first use so that `import var_jax`
loads no JAX:

  load(path_or_name=None)   tokenizer + transformer (`api.LoadedModel`): the
                            bundled digits model, a model directory (local
                            or gs://) or a released name ("d16".."d36")
  Sampler, SampleOptions    class-conditional sampling (`sampling.var.sampler`)
  train(cfg, workdir)       a VAR training run (`training.trainer.train`)
  TrainConfig               its configuration (`training.config`)
"""

import importlib

__version__ = "0.1.0"

# Public name -> (module, attribute), imported when first used.
_LAZY = {
    "load": ("var_jax.api", "load"),
    "LoadedModel": ("var_jax.api", "LoadedModel"),
    "Sampler": ("var_jax.sampling.var.sampler", "Sampler"),
    "SampleOptions": ("var_jax.sampling.var.options", "SampleOptions"),
    "train": ("var_jax.training.trainer", "train"),
    "TrainConfig": ("var_jax.training.config", "TrainConfig"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f"module 'var_jax' has no attribute {name!r}")
  module, attr = _LAZY[name]
  value = getattr(importlib.import_module(module), attr)
  globals()[name] = value  # Later lookups skip this function.
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
