"""A full-size tokenizer recipe: the released architecture on ImageNet 256px.

`vae_ch160v4096z32` (4096 codes, 32 channels, scales 1..16, 16x down)
trained with VQGAN's compound loss: L1 + LPIPS (weight 1) reconstruction,
the quantizer's commitment/codebook loss (beta 0.25), and a 3-layer PatchGAN
hinge loss with the adaptive weight (0.8) switched on after 100k steps.
Adam betas (0.5, 0.9) and VQGAN's lr rule 4.5e-6 x batch (5.8e-4 at 128),
cosine to 1% after a 1% warmup. Dead codes restart every 1000 steps.
After training it measures reconstruction PSNR on `validation` (with
`--data folder:PATH`, PATH/val or PATH/validation, whichever exists);
`--eval-split none` skips that, `--eval-batch N` sizes it.

LPIPS needs VGG weights the user supplies:
  var-jax train-vae --config train_vae_imagenet --workdir DIR \\
      --lpips-weights vgg16-397923af.pth,vgg.pth
(torchvision's VGG16 and the lpips package's linear heads; see
var_jax/convert/lpips.py for the single-file .npz form).
"""

from var_jax.training.config import VAETrainConfig


def get_config() -> VAETrainConfig:
  return VAETrainConfig(
      model="vqvae", name="vqvae_imagenet", data="tfds:imagenet2012",
      global_batch=128, steps=400_000, lr=None, blr=4.5e-6, b1=0.5, b2=0.9,
      wd=0.0, clip=0.0, sche="cos", warmup=0.01, wpe=0.01,
      l1_weight=1.0, l2_weight=0.0, vq_weight=1.0, lpips_weight=1.0,
      disc_weight=0.8, disc_start=100_000, disc_ndf=64, disc_layers=3,
      restart_every=1000, restart_threshold=0.03, dtype="bfloat16",
      hflip=True, mid_reso=1.125, ckpt_every=5000, keep_ckpts=3,
      log_every=50, eval_split="validation", eval_batch=128)
