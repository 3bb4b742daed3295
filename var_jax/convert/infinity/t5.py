"""A Hugging Face T5 checkpoint directory -> `T5Encoder`, without torch or
`transformers`.

The directory is what the Hub holds for google/flan-t5-xl: `config.json` and
the weights as `model.safetensors` or as shards listed by
`model.safetensors.index.json`. Only the encoder is read; a full
encoder-decoder file's `decoder.*` and `lm_head.weight` are left unread.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.convert.rules import Rule, linear, official_to_flat, flat_to_pure
from var_jax.convert.weights import read_checkpoint_dir
from var_jax.errors import ConvertError
from var_jax.io import as_path
from var_jax.models.abstract import abstract_split
from var_jax.models.infinity.t5 import T5Config, T5Encoder

CONFIG = "config.json"
# Keys of a full encoder-decoder checkpoint that the encoder does not use.
UNUSED_PREFIXES = ("decoder.", "lm_head.")
# The encoder's own copy of the shared embedding (tied; checked, not loaded).
_TIED = "encoder.embed_tokens.weight"


def config_from_json(d: dict, where: str = CONFIG) -> T5Config:
  """The encoder's settings from a Hub `config.json` dict.

  Raises:
    ConvertError: a missing field, or a T5 variant we do not implement
      (anything but the gated-GELU feed-forward of T5 v1.1 / flan-t5).
  """
  proj = d.get("feed_forward_proj", "relu")
  act = d.get("dense_act_fn", "gelu_new")
  if proj != "gated-gelu" or act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ConvertError(f"{where}: feed_forward_proj {proj!r} with "
                       f"dense_act_fn {act!r}; only flan-t5's gated-gelu "
                       "(gelu_new) encoder is implemented")
  try:
    return T5Config(
        vocab_size=int(d["vocab_size"]), d_model=int(d["d_model"]),
        d_kv=int(d["d_kv"]), d_ff=int(d["d_ff"]),
        num_layers=int(d["num_layers"]), num_heads=int(d["num_heads"]),
        relative_attention_num_buckets=int(
            d.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(
            d.get("relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)))
  except KeyError as e:
    raise ConvertError(f"{where}: missing field {e.args[0]!r}") from None
  except (TypeError, ValueError) as e:
    raise ConvertError(f"{where}: {e}") from None


def t5_rules(cfg: T5Config) -> list[Rule]:
  """Every tensor of the Hub encoder checkpoint, in order."""
  d, f, i = cfg.d_model, cfg.d_ff, cfg.inner_dim
  r = [Rule("shared.weight", ("embed",), (cfg.vocab_size, d)),
       Rule(_TIED, (), (cfg.vocab_size, d)),
       Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias."
            "weight", ("rel_bias",),
            (cfg.relative_attention_num_buckets, cfg.num_heads))]
  for n in range(cfg.num_layers):
    a = f"encoder.block.{n}.layer.0"
    m = f"encoder.block.{n}.layer.1"
    r += [Rule(f"{a}.layer_norm.weight", ("ln1",), (d,), layer=n)]
    r += [Rule(f"{a}.SelfAttention.{x}.weight", (x,), (i, d), linear, n)
          for x in ("q", "k", "v")]
    r += [Rule(f"{a}.SelfAttention.o.weight", ("o",), (d, i), linear, n),
          Rule(f"{m}.layer_norm.weight", ("ln2",), (d,), layer=n),
          Rule(f"{m}.DenseReluDense.wi_0.weight", ("wi0",), (f, d), linear, n),
          Rule(f"{m}.DenseReluDense.wi_1.weight", ("wi1",), (f, d), linear, n),
          Rule(f"{m}.DenseReluDense.wo.weight", ("wo",), (d, f), linear, n)]
  r.append(Rule("encoder.final_layer_norm.weight", ("final_ln",), (d,)))
  return r


def _check_tied(rules, sd):
  del rules
  if _TIED in sd and not np.array_equal(sd[_TIED], sd["shared.weight"]):
    raise ConvertError(f"T5 checkpoint: {_TIED} differs from shared.weight "
                       "(the encoder's embedding is tied to it)")


def read_encoder_dir(path) -> tuple[T5Config, dict[str, np.ndarray]]:
  """(config, encoder tensors by Hub name) of a checkpoint directory.

  Raises:
    ConvertError: no config.json, no weights, a shard the index names but
      the directory lacks, or an unreadable file.
  """
  root = as_path(path)
  cfg_file = root / CONFIG
  if not cfg_file.is_file():
    raise ConvertError(f"{root}: no {CONFIG} (expected a Hugging Face T5 "
                       f"directory such as google/flan-t5-xl's)")
  try:
    cfg = config_from_json(json.loads(cfg_file.read_text()), str(cfg_file))
  except json.JSONDecodeError as e:
    raise ConvertError(f"{cfg_file}: not JSON ({e})") from None
  return cfg, read_checkpoint_dir(root, UNUSED_PREFIXES)


def encoder_params(cfg: T5Config, sd: dict) -> dict:
  """The pure-dict state of `T5Encoder(cfg)` from Hub tensors (all problems
  in one ConvertError)."""
  abstract = abstract_split(T5Encoder, cfg)[1]
  return flat_to_pure(official_to_flat(abstract, t5_rules(cfg), sd,
                                       "T5 encoder", _check_tied))


def load_encoder(path) -> T5Encoder:
  """The encoder of a Hub T5 directory, ready to run."""
  cfg, sd = read_encoder_dir(path)
  graphdef, state = abstract_split(T5Encoder, cfg)
  params = jax.tree.map(jnp.asarray, encoder_params(cfg, sd))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)
