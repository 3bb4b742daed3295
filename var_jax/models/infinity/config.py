"""Frozen configurations of Infinity's transformer; presets are values."""

from __future__ import annotations

import dataclasses

# What the sampler may store the blocks' matrices and its cache in.
SAMPLING_DTYPES = ("float32", "bfloat16")

@dataclasses.dataclass(frozen=True)
class InfinityConfig:
  """The text-conditioned AdaLN transformer over bitwise token maps.

  `codebook_dim` bits per token (the tokenizer's, times 4 when it
  patchifies space); the head gives two logits per bit. Text arrives from a
  T5 encoder of width `text_channels`.
  """

  depth: int
  embed_dim: int
  num_heads: int
  text_channels: int
  codebook_dim: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  text_maxlen: int = 512  # Rows of the learned null text.
  num_levels: int = 15  # Rows of the scale (level) embedding.

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return int(round(self.embed_dim * self.mlp_ratio / 256) * 256)

  @property
  def pool_heads(self) -> int:
    """Heads of the attentive text pool: one per 128 text channels (64
    for models wider than 4,096)."""
    return self.text_channels // (128 if self.embed_dim <= 4096 else 64)

  @property
  def logits_per_token(self) -> int:
    return 2 * self.codebook_dim

  def validate(self) -> None:
    from var_jax.errors import UserError  # pylint: disable=import-outside-toplevel
    if self.embed_dim % self.num_heads or self.head_dim % 4:
      raise UserError(f"embed_dim {self.embed_dim} must split into "
                      f"{self.num_heads} heads of a multiple of 4 channels")
    if self.embed_dim % self.pool_heads:
      raise UserError(f"embed_dim {self.embed_dim} must split into the text "
                      f"pool's {self.pool_heads} heads")


# tools/run_infinity.py's models (flan-t5-xl text, width 2048).
INFINITY_2B = InfinityConfig(depth=32, embed_dim=2048, num_heads=16,
                             text_channels=2048, codebook_dim=32)
INFINITY_8B = InfinityConfig(depth=40, embed_dim=3584, num_heads=28,
                             text_channels=2048, codebook_dim=56)
