"""An official Infinity tokenizer checkpoint (`{'vae': state_dict}`, e.g.
`infinity_vae_d32reg.pth`) -> `BSQVAE` parameters, through an explicit name
table.

The official convolutions and norms are wrapped (`X.conv.weight`,
`X.norm.weight`); the quantizer's bit-weight buffers (`quantizer.lfq.mask`
and its alias `quantize.lfq.mask`, 2^(d-1) .. 1) are derived: checked,
never loaded.
"""

from __future__ import annotations

import numpy as np

from var_jax.convert.rules import (Rule, flat_to_pure, official_to_flat,
                                   strip_prefixes)
from var_jax.convert.vqgan import stack_rules
from var_jax.errors import ConvertError
from var_jax.models.abstract import abstract_split
from var_jax.models.infinity.bsq import BSQConfig, BSQVAE

_MASKS = ("quantizer.lfq.mask", "quantize.lfq.mask")


def bsq_rules(cfg: BSQConfig) -> list[Rule]:
  """Every tensor of the official tokenizer state dict, in order."""
  return stack_rules(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, 3,
                     cfg.codebook_dim, attention=False, conv_wrap=".conv",
                     norm_wrap=".norm") + [
                         Rule(m, (), (cfg.codebook_dim,)) for m in _MASKS]


def state_dict_of(obj, path) -> dict:
  """The tokenizer's tensors in a checkpoint object (`{'vae': ...}` or a
  plain state dict)."""
  if isinstance(obj, dict) and isinstance(obj.get("vae"), dict):
    obj = obj["vae"]
  if not (isinstance(obj, dict) and obj and all(
      isinstance(v, np.ndarray) for v in obj.values())):
    raise ConvertError(f"{path}: no tokenizer state dict (expected "
                       "{'vae': state_dict} or a plain state dict)")
  return strip_prefixes(obj)


def infer_config(sd: dict) -> BSQConfig:
  """Widths, levels and bits read off the tensors.

  Raises:
    ConvertError: tensors the reading needs are missing.
  """
  need = ("encoder.conv_in.conv.weight", "encoder.conv_out.conv.weight")
  missing = [k for k in need if k not in sd]
  if missing:
    raise ConvertError("not an Infinity tokenizer checkpoint: missing "
                       + ", ".join(missing))
  ch = int(sd["encoder.conv_in.conv.weight"].shape[0])
  levels = sorted({int(k.split(".")[2]) for k in sd
                   if k.startswith("encoder.down.")})
  mult = []
  for i in levels:
    w = sd.get(f"encoder.down.{i}.block.0.conv1.conv.weight")
    if w is None:
      raise ConvertError(f"missing encoder.down.{i}.block.0.conv1.conv.weight")
    mult.append(int(w.shape[0]) // ch)
  blocks = {int(k.split(".")[4]) for k in sd
            if k.startswith("encoder.down.0.block.")}
  return BSQConfig(codebook_dim=int(sd["encoder.conv_out.conv.weight"]
                                    .shape[0]),
                   ch=ch, ch_mult=tuple(mult), num_res_blocks=len(blocks))


def _check_masks(rules, sd):
  del rules
  d = None
  bad = []
  for m in _MASKS:
    if m in sd:
      d = len(sd[m])
      if not np.array_equal(sd[m], 2 ** np.arange(d - 1, -1, -1)):
        bad.append(m)
  if bad:
    raise ConvertError("tokenizer checkpoint's bit weights are not "
                       "2^(d-1) .. 1: " + ", ".join(bad))


def bsq_params(cfg: BSQConfig, sd: dict) -> dict:
  """The pure-dict state of `BSQVAE(cfg)` (all problems in one error)."""
  abstract = abstract_split(BSQVAE, cfg)[1]
  return flat_to_pure(official_to_flat(abstract, bsq_rules(cfg), sd,
                                       "Infinity tokenizer", _check_masks))
