"""VAR-d16 on ImageNet 256x256: the official README command.

`--depth=16 --bs=768 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1` (tblr 1e-4,
wd 0.05 constant, lin0 schedule, clip 2). bfloat16 matmuls replace fp16.
"""

from var_jax.training.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(model="d16", data="tfds:imagenet2012", global_batch=768,
                     epochs=200, tblr=1e-4, adaln_gamma=1e-3, wpe=0.1,
                     dtype="bfloat16")
