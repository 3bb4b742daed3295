"""The golden set's tiny Infinity models, loaded once per process."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.convert.infinity import bsq as bsq_convert
from var_jax.convert.infinity import directory
from var_jax.convert.infinity import infinity as inf_convert
from var_jax.convert.weights import read_state_dict, read_weights
from var_jax.models.abstract import abstract_split
from var_jax.models.infinity.bsq import BSQVAE
from var_jax.models.infinity.transformer import Infinity


def _merge(ctor, cfg, params):
  graphdef, state = abstract_split(ctor, cfg)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=None)
def transformer_sd(golden_dir):
  return read_state_dict(golden_dir / "infinity" / "infinity_tiny.pth")


@functools.lru_cache(maxsize=None)
def transformer(golden_dir):
  return transformer_from_sd(transformer_sd(golden_dir))


def transformer_from_sd(sd):
  """An Infinity transformer from an official state dict, converted."""
  cfg = inf_convert.infer_config(sd)
  return _merge(Infinity, cfg, inf_convert.infinity_params(cfg, sd))


@functools.lru_cache(maxsize=None)
def tokenizer_sd(golden_dir):
  path = golden_dir / "infinity" / "vae_tiny.pth"
  return bsq_convert.state_dict_of(read_weights(path), path)


@functools.lru_cache(maxsize=None)
def tokenizer(golden_dir):
  return tokenizer_from_sd(tokenizer_sd(golden_dir))


def tokenizer_from_sd(sd, transformer_cfg=None):
  """A BSQ tokenizer from an official state dict, converted (as it serves
  `transformer_cfg`, when given: patchifying or not)."""
  cfg = bsq_convert.infer_config(sd)
  if transformer_cfg is not None:
    cfg = directory.paired_tokenizer_config(cfg, transformer_cfg)
  return _merge(BSQVAE, cfg, bsq_convert.bsq_params(cfg, sd))


@functools.lru_cache(maxsize=None)
def arrays(golden_dir):
  with np.load(golden_dir / "infinity" / "golden_infinity.npz") as z:
    return {k: z[k] for k in z.files}


def padded_text(g, rows=slice(None)):
  """The golden prompts' T5 states as the padded batch the models take:
  (states (B, T, C), mask (B, T) int32, 1 on each prompt's tokens)."""
  hidden = g["text/t5_hidden"][rows]
  mask = np.arange(hidden.shape[1]) < g["text/lens"][rows, None]
  return hidden, mask.astype(np.int32)


def patchify_pth(ref_dir, dest):
  """Writes the patchify reference's two models (kept as arrays in
  `weights.npz`) as the official `.pth` files: (transformer, tokenizer)."""
  from pth_writer import write_pth
  with np.load(ref_dir / "weights.npz") as z:
    parts = {"infinity": {}, "vae": {}}
    for k in z.files:
      part, name = k.split("/", 1)
      parts[part][name] = z[k]
  inf, vae = dest / "infinity_tiny_patchify.pth", dest / "vae_tiny_patchify.pth"
  write_pth(inf, parts["infinity"])
  write_pth(vae, {"vae": parts["vae"]})
  return inf, vae
