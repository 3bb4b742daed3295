"""Frozen configuration dataclasses for the VQVAE tokenizer and the VAR transformer.

Presets (values of these classes) live in `configs/` at the repository root and
are installed as `var_jax.configs`; `get_preset(name)` looks them up.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any

from var_jax.errors import IncompatibleModelsError, UserError

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
# Compute dtypes a run or sampler may ask for by name (`jnp.dtype(name)`);
# weights stay float32.
COMPUTE_DTYPES = ("float32", "bfloat16")
# What a training step may recompute in its backward pass (`VAR.__call__`).
REMAT_CHOICES = ("none", "dots", "block")


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
  """Multi-scale residual VQVAE (official `VQVAE`)."""

  vocab_size: int = 4096
  z_channels: int = 32  # Cvae: width of the quantised latent.
  ch: int = 160
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  in_channels: int = 3
  beta: float = 0.25  # Commitment loss weight.
  using_znorm: bool = False
  quant_conv_ks: int = 3
  quant_resi: float = 0.5  # Phi(x) = (1 - r) x + r conv(x).
  share_quant_resi: int = 4  # Number of shared Phi convolutions.
  v_patch_nums: tuple[int, ...] = PATCH_NUMS_256

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def resolution(self) -> int:
    return self.v_patch_nums[-1] * self.downsample


@dataclasses.dataclass(frozen=True)
class VARConfig:
  """VAR transformer (official `VAR`); width = depth * 64 in the released models."""

  depth: int = 16
  embed_dim: int = 1024
  num_heads: int = 16
  num_classes: int = 1000
  vocab_size: int = 4096
  cvae: int = 32
  patch_nums: tuple[int, ...] = PATCH_NUMS_256
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  shared_aln: bool = False
  attn_l2_norm: bool = True
  cond_drop_rate: float = 0.1
  drop_path_rate: float = 0.0

  @property
  def seq_len(self) -> int:
    return sum(pn * pn for pn in self.patch_nums)

  @property
  def first_l(self) -> int:
    return self.patch_nums[0] ** 2

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return round(self.embed_dim * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A tokenizer and (optionally) a transformer that share a scale list."""

  name: str
  vae: VQVAEConfig | None
  var: VARConfig | None = None

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    vae = _build(VQVAEConfig, d["vae"]) if d.get("vae") else None
    var = _build(VARConfig, d["var"]) if d.get("var") else None
    return cls(name=d.get("name", "custom"), vae=vae, var=var)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    return cls.from_dict(json.loads(text))


# What a drafter and its refiner must share: one image (scale list), one
# tokenizer (vocabulary, code width) and one set of labels.
_PAIR_FIELDS = ("patch_nums", "vocab_size", "cvae", "num_classes")
# (VARConfig field, VQVAEConfig field) a transformer and its tokenizer share.
_TOKENIZER_FIELDS = (("vocab_size", "vocab_size"), ("cvae", "z_channels"),
                     ("patch_nums", "v_patch_nums"))


def _value(v):
  return tuple(v) if isinstance(v, list) else v


def check_compatible(vae_cfg: VQVAEConfig | None, var_cfg: VARConfig | None,
                     drafter_cfg: VARConfig | None = None, *,
                     where: str | None = None) -> None:
  """Checks that a tokenizer, a transformer and a drafter can work together.

  The one compatibility rule of the package, on configs only (nothing is
  loaded): a drafter and the transformer (its refiner) must agree in scale
  list, vocabulary, code width and class count; the transformer and the
  tokenizer in vocabulary, code width (`cvae` = `z_channels`) and scale
  list (`patch_nums` = `v_patch_nums`). A part given as None is left out.

  Args:
    vae_cfg: the tokenizer's config.
    var_cfg: the transformer's (with a drafter: the refiner's).
    drafter_cfg: the drafter's config for collaborative decoding.
    where: prefixed to the message (a path, a model name).

  Raises:
    IncompatibleModelsError: the first differing field, with both values.
  """
  head = f"{where}: " if where else ""
  if drafter_cfg is not None and var_cfg is not None:
    for field in _PAIR_FIELDS:
      a, b = _value(getattr(drafter_cfg, field)), _value(getattr(var_cfg,
                                                                 field))
      if a != b:
        raise IncompatibleModelsError(
            f"{head}the drafter and refiner differ in {field}: {a} vs {b}; "
            "collaborative decoding needs one tokenizer, one scale list and "
            "one set of classes")
  if vae_cfg is None or var_cfg is None:
    return
  for field, vae_field in _TOKENIZER_FIELDS:
    a, b = _value(getattr(var_cfg, field)), _value(getattr(vae_cfg,
                                                           vae_field))
    if a != b:
      named = "" if vae_field == field else f"{vae_field} "
      raise IncompatibleModelsError(
          f"{head}the transformer does not fit the tokenizer: VAR {field} "
          f"{a} vs VQVAE {named}{b}")


def _build(klass, d: dict[str, Any]):
  names = {f.name for f in dataclasses.fields(klass)}
  unknown = set(d) - names
  if unknown:
    raise UserError(f"unknown {klass.__name__} fields: {sorted(unknown)}")
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
  return klass(**kw)


def var_for_depth(depth: int, *, vae: VQVAEConfig, shared_aln: bool = False,
                  num_classes: int = 1000, **overrides) -> VARConfig:
  """The released family's scaling rule: width 64 * depth, heads = depth."""
  kw = dict(depth=depth, embed_dim=64 * depth, num_heads=depth,
            num_classes=num_classes, vocab_size=vae.vocab_size,
            cvae=vae.z_channels, patch_nums=vae.v_patch_nums,
            shared_aln=shared_aln, drop_path_rate=0.1 * depth / 24)
  kw.update(overrides)
  return VARConfig(**kw)


def get_preset(name: str) -> ModelConfig:
  """Returns a preset ModelConfig by name (see `configs/models.py`)."""
  mod = importlib.import_module("var_jax.configs.models")
  presets = mod.PRESETS
  if name not in presets:
    raise UserError(f"unknown preset {name!r}; choose from {sorted(presets)}")
  return presets[name]
