"""VAR-d36-s (shared AdaLN) on ImageNet 512x512: the official README command.

`--depth=36 --saln=1 --pn=512 --bs=768 --ep=350 --tblr=8e-5 --fp16=1
--alng=5e-6 --wpe=0.01 --twde=0.08`. The images load at 512px (the preset's
scale list ends at 32x32 tokens).
"""

from var_jax.training.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(model="d36", data="tfds:imagenet2012", global_batch=768,
                     epochs=350, tblr=8e-5, adaln_gamma=5e-6, wpe=0.01,
                     wd_end=0.08, dtype="bfloat16")
