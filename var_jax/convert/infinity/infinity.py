"""An official Infinity checkpoint (`infinity_2b_reg.pth`, ...) -> our
`Infinity` module's parameters, through an explicit name table.

The released 2B model is one `.pth` file; the 8B model is a Hugging Face
checkpoint directory (`infinity_8b_weights/`: shards listed by an index),
read by `read_transformer` either way.

Blocks are stored as `block_chunks.{i}.module.{j}.*`: block number
i * (blocks per chunk) + j. The attention modules' `zero_k_bias` buffers
(keys have no bias) are derived: checked to be zero, never loaded.
"""

from __future__ import annotations

import re

import numpy as np

from var_jax.convert.rules import (Rule, flat_to_pure, linear,
                                   official_to_flat, same, strip_prefixes)
from var_jax.convert.weights import read_checkpoint_dir, read_state_dict
from var_jax.errors import ConvertError
from var_jax.io import as_path
from var_jax.models.abstract import abstract_split
from var_jax.models.infinity.config import InfinityConfig
from var_jax.models.infinity.transformer import Infinity

_BLOCK = re.compile(r"block_chunks\.(\d+)\.module\.(\d+)\.")


def read_transformer(path) -> dict[str, np.ndarray]:
  """The tensors of a transformer checkpoint: a `.pth` / `.safetensors`
  file, or a directory of shards with their index (the 8B release).

  Raises:
    ConvertError, PthError: unreadable or incomplete (named).
  """
  path = as_path(path)
  if path.is_dir():
    return read_checkpoint_dir(path)
  return read_state_dict(path)


def block_prefixes(sd: dict) -> list[str]:
  """The block prefixes of a state dict, in block order."""
  found = {(int(m.group(1)), int(m.group(2)))
           for m in (_BLOCK.match(k) for k in sd) if m}
  return [f"block_chunks.{i}.module.{j}" for i, j in sorted(found)]


def _gss(a):  # (1, 1, 6, C) -> (6, C)
  return a.reshape(a.shape[-2], a.shape[-1])


def _heads(a):  # (1, H, 1, 1) -> (H,)
  return a.reshape(-1)


def _pool_q(a):  # (1, Hp, cp) -> (Hp, cp)
  return a.reshape(a.shape[1:])


def _start(a):  # (1, 1, C) -> (C,)
  return a.reshape(-1)


def infinity_rules(cfg: InfinityConfig, prefixes: list[str]) -> list[Rule]:
  """Every tensor of the official state dict; `prefixes` name the blocks
  in order (`block_prefixes`)."""
  c, t, f = cfg.embed_dim, cfg.text_channels, cfg.mlp_dim
  hp, v = cfg.pool_heads, cfg.logits_per_token
  r = [
      Rule("cfg_uncond", ("cfg_uncond",), (cfg.text_maxlen, t)),
      Rule("pos_start", ("pos_start",), (1, 1, c), _start),
      Rule("text_norm.weight", ("text_norm",), (t,)),
      Rule("text_proj_for_sos.ca.mat_q", ("pool_q",), (1, hp, c // hp),
           _pool_q),
      Rule("text_proj_for_sos.ca.v_bias", ("pool_v_bias",), (c,)),
      Rule("text_proj_for_sos.ca.zero_k_bias", (), (c,)),
      Rule("text_proj_for_sos.ca.mat_kv.weight", ("pool_kv",), (2 * c, t),
           linear),
      Rule("text_proj_for_sos.ca.proj.weight", ("pool_proj",), (c, c),
           linear),
      Rule("text_proj_for_sos.ca.proj.bias", ("pool_proj_b",), (c,)),
      Rule("text_proj_for_ca.0.weight", ("text_ca1",), (c, t), linear),
      Rule("text_proj_for_ca.0.bias", ("text_ca1_b",), (c,)),
      Rule("text_proj_for_ca.2.weight", ("text_ca2",), (c, c), linear),
      Rule("text_proj_for_ca.2.bias", ("text_ca2_b",), (c,)),
      Rule("lvl_embed.weight", ("lvl_embed",), (cfg.num_levels, c)),
      Rule("word_embed.weight", ("word_embed",), (c, cfg.codebook_dim),
           linear),
      Rule("word_embed.bias", ("word_embed_b",), (c,)),
      Rule("shared_ada_lin.1.weight", ("shared_ada",), (6 * c, c), linear),
      Rule("shared_ada_lin.1.bias", ("shared_ada_b",), (6 * c,)),
      Rule("head_nm.ada_lin.1.weight", ("head_ada",), (2 * c, c), linear),
      Rule("head_nm.ada_lin.1.bias", ("head_ada_b",), (2 * c,)),
      Rule("head.weight", ("head",), (v, c), linear),
      Rule("head.bias", ("head_b",), (v,)),
  ]
  for n, b in enumerate(prefixes):
    def rule(name, ours, shape, transform=same, b=b, n=n):
      return Rule(f"{b}.{name}", (ours,), shape, transform, n)
    r += [
        rule("ada_gss", "ada_gss", (1, 1, 6, c), _gss),
        rule("sa.scale_mul_1H11", "scale_mul", (1, cfg.num_heads, 1, 1),
             _heads),
        rule("sa.q_bias", "q_bias", (c,)),
        rule("sa.v_bias", "v_bias", (c,)),
        Rule(f"{b}.sa.zero_k_bias", (), (c,)),
        rule("sa.mat_qkv.weight", "qkv", (3 * c, c), linear),
        rule("sa.proj.weight", "proj", (c, c), linear),
        rule("sa.proj.bias", "proj_b", (c,)),
        rule("ca.v_bias", "ca_v_bias", (c,)),
        Rule(f"{b}.ca.zero_k_bias", (), (c,)),
        rule("ca.mat_q.weight", "ca_q", (c, c), linear),
        rule("ca.mat_q.bias", "ca_q_b", (c,)),
        rule("ca.mat_kv.weight", "ca_kv", (2 * c, c), linear),
        rule("ca.proj.weight", "ca_proj", (c, c), linear),
        rule("ca.proj.bias", "ca_proj_b", (c,)),
        rule("ffn.fc1.weight", "fc1", (f, c), linear),
        rule("ffn.fc1.bias", "fc1_b", (f,)),
        rule("ffn.fc2.weight", "fc2", (c, f), linear),
        rule("ffn.fc2.bias", "fc2_b", (c,)),
        rule("ca_norm.weight", "ca_norm_w", (c,)),
        rule("ca_norm.bias", "ca_norm_b", (c,)),
    ]
  return r


def infer_config(sd: dict) -> InfinityConfig:
  """The transformer's settings read off its tensors.

  Raises:
    ConvertError: a tensor the reading needs is missing.
  """
  sd = strip_prefixes(sd)
  prefixes = block_prefixes(sd)
  need = ["pos_start", "text_norm.weight", "word_embed.weight",
          "cfg_uncond", "lvl_embed.weight"]
  if prefixes:
    need += [f"{prefixes[0]}.sa.scale_mul_1H11", f"{prefixes[0]}.ffn.fc1.weight"]
  missing = [k for k in need if k not in sd]
  if missing or not prefixes:
    raise ConvertError("not an Infinity checkpoint: missing "
                       + (", ".join(missing) or "block_chunks.*"))
  c = int(sd["pos_start"].shape[-1])
  f = int(sd[f"{prefixes[0]}.ffn.fc1.weight"].shape[0])
  return InfinityConfig(
      depth=len(prefixes), embed_dim=c,
      num_heads=int(sd[f"{prefixes[0]}.sa.scale_mul_1H11"].shape[1]),
      text_channels=int(sd["text_norm.weight"].shape[0]),
      codebook_dim=int(sd["word_embed.weight"].shape[1]),
      mlp_ratio=f / c, text_maxlen=int(sd["cfg_uncond"].shape[0]),
      num_levels=int(sd["lvl_embed.weight"].shape[0]))


def _check_zero_biases(rules, sd):
  bad = [r.official for r in rules
         if r.derived and r.official in sd and np.any(sd[r.official])]
  if bad:
    raise ConvertError("Infinity checkpoint: key biases that must be zero "
                       "are not: " + ", ".join(bad))


def infinity_params(cfg: InfinityConfig, sd: dict) -> dict:
  """The pure-dict state of `Infinity(cfg)` (all problems in one error)."""
  sd = strip_prefixes(sd)
  abstract = abstract_split(Infinity, cfg)[1]
  return flat_to_pure(official_to_flat(
      abstract, infinity_rules(cfg, block_prefixes(sd)), sd, "Infinity",
      _check_zero_biases))
