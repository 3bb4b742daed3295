"""VAR-d20 on ImageNet 256x256: the official README command.

`--depth=20 --bs=768 --ep=250 --fp16=1 --alng=1e-3 --wpe=0.1`.
"""

from var_jax.training.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(model="d20", data="tfds:imagenet2012", global_batch=768,
                     epochs=250, tblr=1e-4, adaln_gamma=1e-3, wpe=0.1,
                     dtype="bfloat16")
