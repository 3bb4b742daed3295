"""Applying the mapping table: official state dicts into NNX models and back.

Every problem in a file (unknown, missing or misshaped keys, wrong derived
buffers) is collected first and reported together in one `ConvertError`.
"""

from __future__ import annotations

import re

import numpy as np
from flax import nnx

from var_jax.models.var.config import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, VQVAEConfig
from var_jax.errors import ConvertError
from var_jax.convert import rules as rules_lib
from var_jax.convert.rules import Rule, flat_to_pure, strip_prefixes
from var_jax.models.scales import layout


def _check_derived(rules, sd, patch_nums, what):
  bad = []
  for r in rules:
    if not r.derived or r.official not in sd:
      continue
    a = np.asarray(sd[r.official])
    if r.official == "lvl_1L":
      ok = np.array_equal(a.reshape(-1), layout(patch_nums).level_ids())
    elif r.official == "attn_bias_for_masking":
      lvl = layout(patch_nums).level_ids()
      want_open = lvl[:, None] >= lvl[None, :]
      ok = np.array_equal(a.reshape(len(lvl), len(lvl)) == 0, want_open)
    else:  # zero_k_bias
      ok = not np.any(a)
    if not ok:
      bad.append(r.official)
  if bad:
    raise ConvertError(f"{what} checkpoint's derived buffers disagree with "
                       f"scale list {tuple(patch_nums)}: " + ", ".join(bad))


def official_to_flat(abstract_state, rules: list[Rule], sd: dict, what: str,
                     patch_nums=None) -> dict:
  """`rules.official_to_flat`, checking VAR's derived buffers against
  `patch_nums` when given."""
  check = (None if patch_nums is None else
           lambda rs, d: _check_derived(rs, d, patch_nums, what))
  return rules_lib.official_to_flat(abstract_state, rules, sd, what, check)


def load_official(model: nnx.Module, rules: list[Rule], sd: dict, what: str,
                  patch_nums=None) -> None:
  """Writes an official state dict into `model` in place (after full checks)."""
  import jax.numpy as jnp  # Local: keeps the table importable cheaply.
  state = nnx.state(model)
  values = official_to_flat(state, rules, sd, what, patch_nums)
  nnx.replace_by_pure_dict(
      state, flat_to_pure({p: jnp.asarray(a) for p, a in values.items()}))
  nnx.update(model, state)


# ------------------------------------------------------------ config inference
def infer_vqvae_config(sd: dict, patch_nums=None) -> VQVAEConfig:
  """Reads widths and codebook size off the tensors (the layout is fixed)."""
  sd = strip_prefixes(sd)
  try:
    vocab, z = sd["quantize.embedding.weight"].shape
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in sd
                     if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch
                 for i in levels)
    nres = len({int(m.group(1)) for k in sd
                if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    n_scales = sd["quantize.ema_vocab_hit_SV"].shape[0]
    ks = sd["quant_conv.weight"].shape[-1]
  except KeyError as e:
    raise ConvertError(f"not a VQVAE state dict: no key {e.args[0]}") from None
  phis = [k for k in sd if k.startswith("quantize.quant_resi.")
          and k.endswith(".weight")]
  if any(".qresi_ls." in k for k in phis):
    share = len(phis)
  elif any(".qresi." in k for k in phis):
    share = 1
  else:
    share = 0 if phis else 4
  # The weights do not depend on the scale list; the VAR file decides it.
  patch_nums = tuple(patch_nums or PATCH_NUMS_256)
  if len(patch_nums) != n_scales:
    raise ConvertError(f"the VQVAE usage buffer has {n_scales} scales but the "
                       f"scale list {patch_nums} has {len(patch_nums)}")
  return VQVAEConfig(vocab_size=vocab, z_channels=z, ch=ch, ch_mult=mult,
                     num_res_blocks=nres, quant_conv_ks=ks,
                     share_quant_resi=share,
                     quant_resi=0.5 if phis else 0.0,
                     v_patch_nums=patch_nums)


def infer_var_config(sd: dict) -> VARConfig:
  """Reads depth, width, heads, vocabulary, classes and scales off the tensors."""
  sd = strip_prefixes(sd)
  try:
    c, cvae = sd["word_embed.weight"].shape
    n_cls = sd["class_emb.weight"].shape[0] - 1
    n_lvl = sd["lvl_embed.weight"].shape[0]
    seq = sd["pos_1LC"].shape[1]
    first = sd["pos_start"].shape[1]
    vocab = sd["head.weight"].shape[0]
    heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1]
    mlp = sd["blocks.0.ffn.fc1.weight"].shape[0]
  except KeyError as e:
    raise ConvertError(f"not a VAR state dict: no key {e.args[0]}") from None
  depth = 1 + max(int(m.group(1)) for k in sd
                  if (m := re.match(r"blocks\.(\d+)\.", k)))
  patch_nums = _infer_patch_nums(sd, seq, first, n_lvl)
  return VARConfig(depth=depth, embed_dim=c, num_heads=heads,
                   num_classes=n_cls, vocab_size=vocab, cvae=cvae,
                   patch_nums=patch_nums, mlp_ratio=mlp / c,
                   shared_aln="shared_ada_lin.1.weight" in sd,
                   attn_l2_norm=True, drop_path_rate=0.1 * depth / 24)


ARCH_FIELDS = {
    "VQVAEConfig": ("vocab_size", "z_channels", "ch", "ch_mult",
                    "num_res_blocks", "in_channels", "quant_conv_ks",
                    "share_quant_resi"),
    "VARConfig": ("depth", "embed_dim", "num_heads", "num_classes",
                  "vocab_size", "cvae", "patch_nums", "mlp_ratio",
                  "shared_aln"),
}


def check_preset(preset, inferred, what: str) -> None:
  """A preset must agree with the file on every shape-determining field."""
  fields = ARCH_FIELDS[type(preset).__name__]
  bad = [f"{f}: preset {getattr(preset, f)}, file {getattr(inferred, f)}"
         for f in fields if getattr(preset, f) != getattr(inferred, f)]
  if bad:
    raise ConvertError(f"{what} preset disagrees with the checkpoint: "
                       + "; ".join(bad))


def _infer_patch_nums(sd, seq, first, n_lvl):
  if "lvl_1L" in sd:
    counts = np.bincount(np.asarray(sd["lvl_1L"]).reshape(-1).astype(np.int64),
                         minlength=n_lvl)
    pns = tuple(int(round(np.sqrt(x))) for x in counts)
    if all(p * p == x for p, x in zip(pns, counts)):
      return pns
  for cand in (PATCH_NUMS_256, PATCH_NUMS_512):
    if len(cand) == n_lvl and sum(p * p for p in cand) == seq and \
        cand[0] ** 2 == first:
      return cand
  raise ConvertError(f"cannot infer the scale list: {n_lvl} scales, {seq} "
                     "tokens and no lvl_1L buffer; pass --preset")
