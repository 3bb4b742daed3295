"""VAR-d30 on ImageNet 256x256: the official README command.

`--depth=30 --bs=1024 --ep=350 --tblr=8e-5 --fp16=1 --alng=1e-5 --wpe=0.01
--twde=0.08` (weight decay follows a cosine from 0.05 up to 0.08).
"""

from var_jax.training.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(model="d30", data="tfds:imagenet2012", global_batch=1024,
                     epochs=350, tblr=8e-5, adaln_gamma=1e-5, wpe=0.01,
                     wd_end=0.08, dtype="bfloat16")
