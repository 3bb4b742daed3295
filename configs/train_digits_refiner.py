"""The refiner for collaborative decoding on digits: a half-depth digits VAR.

Same tokenizer (`var_jax/assets/digits`), width, heads and recipe as
`configs/train_digits.py`, with 2 blocks instead of 4 and 1,500 steps instead
of 3,000: about a quarter of the digits VAR's training compute. The digits VAR
drafts the first scales, this model draws the rest (`var-jax sample --fast`).
"""

import dataclasses

from var_jax.models.var.config import ModelConfig
from var_jax.configs.models import DIGITS_VAE, DIGITS_VAR
from var_jax.training.config import TrainConfig

DIGITS_REFINER = dataclasses.replace(DIGITS_VAR, depth=2)


def get_config() -> TrainConfig:
  return TrainConfig(
      model=ModelConfig("digits_refiner", DIGITS_VAE, DIGITS_REFINER),
      data="digits", global_batch=64, epochs=1, steps=1500, lr=1e-3, wd=0.05,
      wp=0.05, clip=2.0, cond_drop_rate=0.1, drop_path_rate=0.0,
      label_smooth=0.0, dtype="float32", ckpt_every=500, keep_ckpts=2,
      log_every=10, data_workers=0)
