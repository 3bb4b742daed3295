"""A seconds-long CPU tokenizer run for tests, on digits at 16px.

The tokenizer fits `train_tiny`'s VAR (vocabulary 512, 16 latent channels,
scales 1, 2, 3, 4) but is narrow and shallow: three levels (4x down, so
16px images) with one res block each. Dead-code restart runs every 4 steps
so that short runs exercise it. float32 so runs on different meshes agree
to rounding.
"""

from var_jax.models.var.config import ModelConfig, VQVAEConfig
from var_jax.training.config import VAETrainConfig

TINY_VAE = VQVAEConfig(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 1, 1),
                       num_res_blocks=1, v_patch_nums=(1, 2, 3, 4))


def get_config() -> VAETrainConfig:
  return VAETrainConfig(
      model=ModelConfig("train_vae_tiny", TINY_VAE), data="digits",
      global_batch=8, steps=8, lr=2e-3, b1=0.9, b2=0.99, sche="lin00",
      warmup=0.0, wpe=0.1, l1_weight=1.0, l2_weight=1.0, vq_weight=1.0,
      restart_every=4, restart_threshold=0.03, dtype="float32",
      ckpt_every=2, keep_ckpts=2, data_workers=0, eval_split="val",
      eval_batch=60)
