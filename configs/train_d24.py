"""VAR-d24 on ImageNet 256x256: the official README command.

`--depth=24 --bs=768 --ep=350 --tblr=8e-5 --fp16=1 --alng=1e-4 --wpe=0.01`.
"""

from var_jax.training.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(model="d24", data="tfds:imagenet2012", global_batch=768,
                     epochs=350, tblr=8e-5, adaln_gamma=1e-4, wpe=0.01,
                     dtype="bfloat16")
