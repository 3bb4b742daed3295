"""Tokenizer training configuration: one frozen dataclass from a Python file.

A config file (e.g. `configs/train_vae_digits.py`) defines `get_config()`
returning a `VAETrainConfig`. The loss is VQGAN's: reconstruction (L1 and/or
L2), the quantizer's commitment/codebook term, and optionally LPIPS and a
PatchGAN hinge loss with the adaptive weight, switched on at `disc_start`.
"""

from __future__ import annotations

import dataclasses

from var_jax.errors import UserError
from var_jax.config import ModelConfig, VQVAEConfig, get_preset
from var_jax.training import schedule
from var_jax.training.config import load_config_object


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
  """Everything that defines a tokenizer training run."""

  # A preset name (its tokenizer), a ModelConfig or a VQVAEConfig.
  model: str | ModelConfig | VQVAEConfig = "vqvae"
  name: str | None = None  # Name in the exported config.json.
  data: str = "tfds:imagenet2012"  # folder:PATH | tfds:NAME | digits.
  global_batch: int = 64
  steps: int = 100_000
  # AdamW; the peak lr is `lr`, or VQGAN's rule blr * global_batch.
  lr: float | None = None
  blr: float = 4.5e-6
  b1: float = 0.5
  b2: float = 0.9
  wd: float = 0.0  # Convolution kernels only.
  clip: float = 0.0  # Global grad-norm clip; <= 0 only records the norm.
  sche: str = "cos"  # See `schedule.lr_ratio`.
  warmup: float = 0.0  # Fraction of the run.
  wp0: float = 0.005
  wpe: float = 0.01
  # Loss weights.
  l1_weight: float = 1.0
  l2_weight: float = 0.0
  vq_weight: float = 1.0  # Of the mean (beta * commit + codebook) over scales.
  lpips_weight: float = 0.0
  lpips_weights: str | None = None  # FILE.npz or VGG.pth,LIN.pth.
  disc_weight: float = 0.0  # 0: no discriminator at all.
  disc_start: int = 0  # First step with the adversarial terms.
  disc_lr: float | None = None  # None: the generator's.
  disc_ndf: int = 64
  disc_layers: int = 3
  max_d_weight: float = 1e4
  # Codebook upkeep: every `restart_every` steps (0: never), codes whose
  # usage EMA (summed over scales) is below `restart_threshold` times a
  # uniform share restart from random latent vectors of the batch.
  restart_every: int = 0
  restart_threshold: float = 0.03
  # Numerics, data, checkpoints.
  dtype: str = "float32"
  hflip: bool = False
  mid_reso: float = 1.125
  data_workers: int | None = None
  tfds_data_dir: str | None = None
  seed: int = 0
  ckpt_every: int = 1000
  keep_ckpts: int = 3
  log_every: int = 1
  # Held-out reconstruction PSNR after training (None: skipped).
  eval_split: str | None = None
  eval_batch: int = 64

  def vae_config(self) -> VQVAEConfig:
    m = self.model
    if isinstance(m, str):
      m = get_preset(m)
    if isinstance(m, ModelConfig):
      if m.vae is None:
        raise UserError(f"model {m.name!r} has no tokenizer")
      m = m.vae
    return m

  def model_config(self) -> ModelConfig:
    """What the exported model directory's config.json describes."""
    name = self.name or (self.model if isinstance(self.model, str) else
                         getattr(self.model, "name", "vqvae"))
    return ModelConfig(name=str(name), vae=self.vae_config())

  @property
  def peak_lr(self) -> float:
    return self.lr if self.lr is not None else self.blr * self.global_batch

  @property
  def peak_disc_lr(self) -> float:
    return self.disc_lr if self.disc_lr is not None else self.peak_lr

  @property
  def gan(self) -> bool:
    return self.disc_weight > 0

  def gan_at(self, step: int) -> bool:
    """Whether `step` trains with the adversarial terms (and the critic)."""
    return self.gan and step >= self.disc_start

  def lr_at(self, step: int) -> tuple[float, float]:
    """(generator lr, discriminator lr) of `step`."""
    ratio = schedule.lr_ratio(self.sche, step, self.warmup * self.steps,
                              self.steps, wp0=self.wp0, wpe=self.wpe)
    return ratio * self.peak_lr, ratio * self.peak_disc_lr

  def validate(self) -> None:
    """Raises UserError naming the first impossible value."""
    from var_jax.models import discriminator, lpips
    vae = self.vae_config()
    res = vae.resolution
    weights = (self.l1_weight, self.l2_weight, self.vq_weight,
               self.lpips_weight, self.disc_weight)
    checks = [
        (self.global_batch >= 1, "global_batch must be >= 1"),
        (self.steps >= 2, "steps must be >= 2"),
        (all(w >= 0 for w in weights), "loss weights must be >= 0"),
        (self.l1_weight + self.l2_weight + self.lpips_weight > 0,
         "no reconstruction loss (l1_weight, l2_weight, lpips_weight all 0)"),
        (self.dtype in ("float32", "bfloat16"),
         f"dtype must be float32 or bfloat16, not {self.dtype!r}"),
        (self.ckpt_every >= 1 and self.keep_ckpts >= 1,
         "ckpt_every and keep_ckpts must be >= 1"),
        (self.log_every >= 1, "log_every must be >= 1"),
        (self.restart_every >= 0 and self.restart_threshold > 0,
         "restart_every must be >= 0 and restart_threshold > 0"),
        (self.disc_start >= 0, "disc_start must be >= 0"),
        (0 <= self.warmup < 1 and round(self.warmup * self.steps)
         < self.steps - 1, "warmup must be a fraction in [0, 1) that leaves "
         "at least 2 steps after it"),
        (self.eval_batch >= 1, "eval_batch must be >= 1"),
        (self.lpips_weight == 0 or res >= lpips.MIN_RESOLUTION,
         f"LPIPS needs >= {lpips.MIN_RESOLUTION}px images, the tokenizer "
         f"works at {res}px"),
        (not self.gan or discriminator.patch_grid(res, self.disc_layers) > 0,
         f"a {self.disc_layers}-layer PatchGAN needs larger images than "
         f"{res}px; lower disc_layers"),
    ]
    for ok, msg in checks:
      if not ok:
        raise UserError(f"bad tokenizer training config: {msg}")
    try:
      self.lr_at(0)
    except ValueError as e:
      raise UserError(f"bad tokenizer training config: {e}") from None
    if self.lpips_weights and self.lpips_weight <= 0:
      raise UserError("LPIPS weights were given but the config's "
                      "lpips_weight is 0: set lpips_weight to use them")
    if self.lpips_weight > 0 and not self.lpips_weights:
      raise UserError(f"lpips_weight={self.lpips_weight} needs VGG weights: "
                      "pass --lpips-weights FILE.npz or VGG16.pth,LPIPS_VGG.pth"
                      " (see var_jax/models/lpips.py)")


def load_vae_config(ref: str) -> VAETrainConfig:
  """A VAETrainConfig from a file or a bundled name ('train_vae_digits')."""
  return load_config_object(ref, "train_vae_", VAETrainConfig,
                            "train_vae_digits")
