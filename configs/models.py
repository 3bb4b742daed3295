"""Model presets: the released checkpoints and the tiny golden-test models.

Each preset is a value (a frozen `ModelConfig`); nothing here subclasses.
"""

from var_jax.models.var.config import (PATCH_NUMS_256, PATCH_NUMS_512, ModelConfig,
                            VARConfig, VQVAEConfig, var_for_depth)

# The released tokenizer `vae_ch160v4096z32.pth`.
VQVAE_256 = VQVAEConfig(vocab_size=4096, z_channels=32, ch=160,
                        v_patch_nums=PATCH_NUMS_256)
VQVAE_512 = VQVAEConfig(vocab_size=4096, z_channels=32, ch=160,
                        v_patch_nums=PATCH_NUMS_512)

# The tiny models of ../shared/golden/config_tiny.json.
TINY_VAE_256 = VQVAEConfig(vocab_size=256, z_channels=16, ch=32,
                           v_patch_nums=PATCH_NUMS_256)
TINY_VAE_512 = VQVAEConfig(vocab_size=256, z_channels=16, ch=32,
                           v_patch_nums=PATCH_NUMS_512)


def _tiny_var(vae, shared_aln):
  return VARConfig(depth=2, embed_dim=128, num_heads=2, num_classes=10,
                   vocab_size=vae.vocab_size, cvae=vae.z_channels,
                   patch_nums=vae.v_patch_nums, shared_aln=shared_aln,
                   attn_l2_norm=True, cond_drop_rate=0.1)


# The embedded default model: sklearn digits upscaled to 64px, 16x down.
DIGITS_VAE = VQVAEConfig(vocab_size=512, z_channels=16, ch=32,
                         ch_mult=(1, 1, 2, 2, 4),
                         v_patch_nums=(1, 2, 3, 4))
DIGITS_VAR = VARConfig(depth=4, embed_dim=128, num_heads=4, num_classes=10,
                       vocab_size=512, cvae=16, patch_nums=(1, 2, 3, 4),
                       shared_aln=False, attn_l2_norm=True, cond_drop_rate=0.1,
                       drop_path_rate=0.0)

PRESETS = {
    "vqvae": ModelConfig("vqvae", VQVAE_256),
    "d16": ModelConfig("d16", VQVAE_256, var_for_depth(16, vae=VQVAE_256)),
    "d20": ModelConfig("d20", VQVAE_256, var_for_depth(20, vae=VQVAE_256)),
    "d24": ModelConfig("d24", VQVAE_256, var_for_depth(24, vae=VQVAE_256)),
    "d30": ModelConfig("d30", VQVAE_256, var_for_depth(30, vae=VQVAE_256)),
    "d36": ModelConfig("d36", VQVAE_512,
                       var_for_depth(36, vae=VQVAE_512, shared_aln=True)),
    "tiny": ModelConfig("tiny", TINY_VAE_256, _tiny_var(TINY_VAE_256, False)),
    "tiny_saln512": ModelConfig("tiny_saln512", TINY_VAE_512,
                                _tiny_var(TINY_VAE_512, True)),
    "digits": ModelConfig("digits", DIGITS_VAE, DIGITS_VAR),
}
