"""The bundled default model's tokenizer: DIGITS_VAE on sklearn digits, 64px.

512 codes of 16 channels over scales (1, 2, 3, 4), 16x down, ch 32 (the
`digits` preset), trained on the 1,617-image train split (every 10th digit
is held out and scored at the end). Loss: L1 + L2 reconstruction and the
quantizer's VQ loss; no LPIPS or GAN (the digits are flat, blurry
upscales). Dead codes restart every 50 steps, so most of the codebook is
in use when the VAR is trained on it.

Budget: about 12 minutes on 2 CPU cores. A step of batch 16 takes about
1 s there, so 700 steps (about 7 epochs); the peak lr 1e-3 with Adam betas
(0.9, 0.99) is high for a VQGAN, but this model is small and the run short.
float32: bfloat16 has no fast path on CPUs.
"""

from var_jax.training.config import VAETrainConfig


def get_config() -> VAETrainConfig:
  return VAETrainConfig(
      model="digits", name="digits_vae", data="digits", global_batch=16,
      steps=700, lr=1e-3, b1=0.9, b2=0.99, wd=0.0, clip=1.0, sche="cos",
      warmup=0.02, wpe=0.05, l1_weight=1.0, l2_weight=1.0, vq_weight=1.0,
      restart_every=50, restart_threshold=0.03, dtype="float32",
      ckpt_every=100, keep_ckpts=2, log_every=10, data_workers=0,
      eval_split="val", eval_batch=60)
