"""A seconds-long CPU run for tests: a 2-block VAR over the digits tokenizer.

64px images, 4 scales (1, 2, 3, 4): 30 tokens per image. float32 so that
runs on different meshes agree to rounding.
"""

from var_jax.models.var.config import ModelConfig, VARConfig
from var_jax.configs.models import DIGITS_VAE
from var_jax.training.config import TrainConfig

TINY_VAR = VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10,
                     vocab_size=DIGITS_VAE.vocab_size,
                     cvae=DIGITS_VAE.z_channels,
                     patch_nums=DIGITS_VAE.v_patch_nums, drop_path_rate=0.05)


def get_config() -> TrainConfig:
  return TrainConfig(
      model=ModelConfig("train_tiny", DIGITS_VAE, TINY_VAR), data="digits",
      global_batch=8, epochs=1, steps=6, tblr=1e-4, lr=3e-4, wp=0.2,
      dtype="float32", ckpt_every=2, keep_ckpts=2, data_workers=0)
