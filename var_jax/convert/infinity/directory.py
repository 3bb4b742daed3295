"""Infinity model directories: the official files, converted once.

  DIR/config.json      {"family": "infinity", "infinity": {...},
                        "tokenizer": {...}, "text_encoder": {...}}
  DIR/infinity/        Orbax tree of the transformer
  DIR/tokenizer/       Orbax tree of the BSQ tokenizer
  DIR/text_encoder/    Orbax tree of the T5 encoder
  DIR/tokenizer.json   the text encoder's prompt tokenizer, copied

Written to a temporary sibling and renamed into place (`io.atomic_dir`), so a
failed conversion leaves nothing behind. Reading compares every stored tree
with the model config.json describes before restoring it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

from var_jax import checkpoint
from var_jax.convert.infinity import bsq as bsq_convert
from var_jax.convert.infinity import infinity as inf_convert
from var_jax.convert.infinity import t5 as t5_convert
from var_jax.convert.weights import read_weights
from var_jax.data.text import TOKENIZER_FILE
from var_jax.errors import CheckpointError, ConvertError
from var_jax.io import as_path, atomic_dir, write_text
from var_jax.models.infinity.bsq import BSQConfig, BSQVAE
from var_jax.models.infinity.config import InfinityConfig
from var_jax.models.infinity.t5 import T5Config, T5Encoder
from var_jax.models.infinity.transformer import Infinity

FAMILY = "infinity"
_PARTS = (("infinity", Infinity, InfinityConfig, "Infinity transformer"),
          ("tokenizer", BSQVAE, BSQConfig, "BSQ tokenizer"),
          ("text_encoder", T5Encoder, T5Config, "T5 text encoder"))


class Models(NamedTuple):
  transformer: Infinity
  tokenizer: BSQVAE
  text_encoder: T5Encoder
  tokenizer_file: object  # epath.Path of tokenizer.json.


def check_parts(inf: InfinityConfig, vae: BSQConfig, text: T5Config) -> None:
  """The three models must fit together.

  Raises:
    ConvertError: naming each mismatch.
  """
  bits = vae.codebook_dim * (4 if vae.spatial_patchify else 1)
  bad = []
  if bits != inf.codebook_dim:
    bad.append(f"the tokenizer gives {bits} bits per token, the transformer "
               f"takes {inf.codebook_dim}")
  if text.d_model != inf.text_channels:
    bad.append(f"the text encoder is {text.d_model} wide, the transformer "
               f"reads {inf.text_channels} channels")
  if bad:
    raise ConvertError("the files do not belong together: " + "; ".join(bad))


def paired_tokenizer_config(vae: BSQConfig, inf: InfinityConfig) -> BSQConfig:
  """The tokenizer's config as it serves `inf`: a tokenizer's weights do not
  say whether it patchifies space (the 8B layout); a transformer that takes
  four times its bits per token says it does."""
  if vae.codebook_dim * 4 == inf.codebook_dim:
    return dataclasses.replace(vae, spatial_patchify=True)
  return vae


def convert(infinity_path, tokenizer_path, text_encoder_dir, out_dir, *,
            overwrite: bool = False, log=print):
  """Official files -> a model directory (see the module docstring).

  Args:
    infinity_path: the transformer's `.pth` (e.g. infinity_2b_reg.pth) or
      sharded checkpoint directory (infinity_8b_weights/).
    tokenizer_path: the tokenizer's `.pth` (e.g. infinity_vae_d32reg.pth).
    text_encoder_dir: a Hub T5 directory (config.json, safetensors,
      tokenizer.json), e.g. google/flan-t5-xl's.

  Raises:
    ConvertError, PthError, DataError: unreadable or mismatched inputs, all
      checked before anything is written.
  """
  sd = inf_convert.read_transformer(infinity_path)
  inf_cfg = inf_convert.infer_config(sd)
  inf_params = inf_convert.infinity_params(inf_cfg, sd)
  log(f"read {infinity_path}: {inf_cfg.depth} blocks of width "
      f"{inf_cfg.embed_dim}")
  vae_sd = bsq_convert.state_dict_of(read_weights(tokenizer_path),
                                     tokenizer_path)
  vae_cfg = paired_tokenizer_config(bsq_convert.infer_config(vae_sd), inf_cfg)
  vae_params = bsq_convert.bsq_params(vae_cfg, vae_sd)
  log(f"read {tokenizer_path}: {vae_cfg.codebook_dim} bits per token")
  t5_cfg, t5_sd = t5_convert.read_encoder_dir(text_encoder_dir)
  t5_params = t5_convert.encoder_params(t5_cfg, t5_sd)
  tok = as_path(text_encoder_dir) / TOKENIZER_FILE
  if not tok.is_file():
    raise ConvertError(f"{text_encoder_dir}: no {TOKENIZER_FILE} (the "
                       "prompt tokenizer of the text encoder's repository)")
  log(f"read {text_encoder_dir}: {t5_cfg.num_layers} layers of width "
      f"{t5_cfg.d_model}")
  check_parts(inf_cfg, vae_cfg, t5_cfg)
  config = {"family": FAMILY, "infinity": dataclasses.asdict(inf_cfg),
            "tokenizer": dataclasses.asdict(vae_cfg),
            "text_encoder": dataclasses.asdict(t5_cfg)}
  with atomic_dir(out_dir, overwrite) as tmp:
    write_text(tmp / "config.json", json.dumps(config, indent=1))
    for (name, *_), params in zip(_PARTS, (inf_params, vae_params,
                                           t5_params)):
      checkpoint.save_tree(tmp / name, params)
    (tmp / TOKENIZER_FILE).write_bytes(tok.read_bytes())
  log(f"wrote {out_dir}")
  return as_path(out_dir)


def _config(d, key: str, cls):
  fields = dict(d[key])
  for k, v in fields.items():
    if isinstance(v, list):
      fields[k] = tuple(v)
  return cls(**fields)


def load(model_dir) -> Models:
  """The three models and the prompt tokenizer file of a directory.

  Raises:
    CheckpointError: not an Infinity model directory, or a tree that does
      not match config.json (one line).
  """
  root = as_path(model_dir)
  cfg_file = root / "config.json"
  if not cfg_file.is_file():
    raise CheckpointError(f"{root}: no config.json (not a model directory; "
                          "`var-jax convert-infinity` writes one)")
  try:
    d = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_file}: not JSON ({e})") from None
  if not isinstance(d, dict) or d.get("family") != FAMILY:
    raise CheckpointError(f"{root} is not an Infinity model directory "
                          f"(config.json family {d.get('family')!r})"
                          if isinstance(d, dict) else
                          f"{cfg_file}: not an object")
  models = []
  for name, ctor, cls, what in _PARTS:
    try:
      cfg = _config(d, name, cls)
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"{cfg_file}: bad {name!r} entry ({e})") from None
    models.append(checkpoint.restore_module(root / name, ctor, cfg, what))
  tok = root / TOKENIZER_FILE
  if not tok.is_file():
    raise CheckpointError(f"{root}: no {TOKENIZER_FILE}")
  return Models(*models, tok)
