"""Run configurations: frozen dataclasses, loaded from Python files.

`RunConfig` holds what every training run has (data, batch, numerics,
checkpoints, logging) and its checks; `TrainConfig` (VAR) and
`VAETrainConfig` (the tokenizer) add their model and recipe. A config file
(e.g. `configs/train_d16.py`) defines `get_config()` returning one. Field
names follow the official `utils/arg_util.py` where one exists (its flag in
brackets).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import types

from var_jax.models.var.config import (COMPUTE_DTYPES, REMAT_CHOICES,
                                       ModelConfig, VQVAEConfig, get_preset)
from var_jax.errors import UserError
from var_jax.io import as_path, is_local
from var_jax.training import schedule


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The fields and checks both trainers share."""

  KIND = "run"  # Names the config in error messages.
  # Fields that may change when a run resumes: they do not change its math
  # (or name where the same inputs live).
  RESUMABLE = frozenset({"data", "data_workers", "tfds_data_dir",
                         "ckpt_every", "keep_ckpts", "log_every", "vae_ckpt",
                         "init_ckpt", "lpips_weights", "eval_split",
                         "eval_batch"})

  data: str = "tfds:imagenet2012"  # folder:PATH | tfds:NAME | digits | tokens:F.
  global_batch: int = 64  # Examples per optimizer step, all processes [bs].
  dtype: str = "float32"  # Matmul compute dtype; weights stay float32.
  hflip: bool = False  # [hflip]
  mid_reso: float = 1.125  # [mid_reso] shorter side before the random crop.
  data_workers: int | None = None
  tfds_data_dir: str | None = None
  seed: int = 0
  ckpt_every: int = 1000
  keep_ckpts: int = 3
  log_every: int = 1
  # Held-out evaluation once training ends, on this split (`val` and
  # `validation` are one split; None: no evaluation) in batches of
  # `eval_batch` examples over all processes (a remainder is left out).
  eval_split: str | None = None
  eval_batch: int = 64

  @property
  def accum_steps(self) -> int:
    """Micro-batches per optimizer step."""
    return 1

  def total_steps(self, steps_per_epoch: int) -> int:
    raise NotImplementedError

  def _checks(self) -> list[tuple[bool, str]]:
    return [
        (self.global_batch >= 1, "global_batch must be >= 1 (--global-batch)"),
        (self.dtype in COMPUTE_DTYPES,
         f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, not "
         f"{self.dtype!r}"),
        (self.ckpt_every >= 1 and self.keep_ckpts >= 1,
         "ckpt_every and keep_ckpts must be >= 1"),
        (self.log_every >= 1, "log_every must be >= 1"),
        (self.mid_reso >= 1, "mid_reso must be >= 1"),
        (self.eval_batch >= 1, "eval_batch must be >= 1 (--eval-batch)"),
        (self.eval_split is None or bool(self.eval_split),
         "eval_split must be a split name or None (--eval-split none)"),
    ]

  def validate(self) -> None:
    """Raises UserError naming the first field with an impossible value."""
    for ok, msg in self._checks():
      if not ok:
        raise UserError(f"bad {self.KIND} config: {msg}")

  def record(self) -> dict:
    """The config as JSON values (stored with the run's checkpoints)."""
    return json.loads(json.dumps(dataclasses.asdict(self), default=str))


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
  """A VAR training run (everything except where it runs)."""

  KIND = "training"

  model: str | ModelConfig = "d16"  # A preset name or a ModelConfig.
  global_batch: int = 768
  dtype: str = "bfloat16"  # Stands in for the official fp16 autocast.
  epochs: int = 200  # [ep]
  steps: int | None = None  # Run length in steps; overrides epochs.
  # Optimizer [tblr, tlr, twd, twde, tclip]; peak lr = tblr * batch / 256.
  tblr: float = 1e-4
  lr: float | None = None
  wd: float = 0.05
  wd_end: float | None = None  # None: constant wd (the official default).
  clip: float = 2.0
  label_smooth: float = 0.0  # [ls]
  # Schedule [sche, wp, wp0, wpe]; warmup in epochs, None = epochs / 50.
  sche: str = "lin0"
  wp: float | None = None
  wp0: float = 0.005
  wpe: float = 0.01
  grad_accum: int = 1  # [ac] micro-batches per step.
  remat: str = "none"  # Recomputed in the backward pass: none, dots, block.
  # Progressive training [pg, pg0, pgwp]; pgwp None = epochs / 300.
  pg: float = 0.0
  pg0: int = 4
  pgwp: float | None = None
  # Initialisation [alng] and regularisation.
  adaln_gamma: float = 1e-5
  drop_path_rate: float | None = None  # None: the preset's (0.1 * depth / 24).
  cond_drop_rate: float = 0.1
  # Weights: a tokenizer directory, or a full model directory to start from.
  vae_ckpt: str | None = None
  init_ckpt: str | None = None

  @property
  def accum_steps(self) -> int:
    return self.grad_accum

  def model_config(self) -> ModelConfig:
    """The ModelConfig with this run's dropout rates applied."""
    m = get_preset(self.model) if isinstance(self.model, str) else self.model
    if m.var is None:
      raise UserError(f"model {m.name!r} has no VAR transformer to train")
    kw = {"cond_drop_rate": self.cond_drop_rate}
    if self.drop_path_rate is not None:
      kw["drop_path_rate"] = self.drop_path_rate
    return dataclasses.replace(m, var=dataclasses.replace(m.var, **kw))

  @property
  def peak_lr(self) -> float:
    return self.lr if self.lr is not None else (
        self.tblr * self.global_batch / 256)

  @property
  def schedule_type(self) -> str:
    # Progressive training implies the official 'lin<pg>' schedule.
    return f"lin{self.pg:g}" if self.pg > 0 else self.sche

  def total_steps(self, steps_per_epoch: int) -> int:
    return self.steps if self.steps is not None else (
        self.epochs * steps_per_epoch)

  def warmup_steps(self, total: int) -> float:
    wp = self.wp if self.wp is not None else self.epochs / 50
    return wp / self.epochs * total

  def prog_warmup_steps(self, total: int) -> float:
    pgwp = self.pgwp if self.pgwp is not None else self.epochs / 300
    return pgwp / self.epochs * total

  def _checks(self):
    return super()._checks() + [
        (self.steps is None or self.steps >= 1, "steps must be >= 1"),
        (self.epochs >= 1, "epochs must be >= 1"),
        (self.grad_accum >= 1, "grad_accum must be >= 1"),
        (self.remat in REMAT_CHOICES, f"remat must be one of "
         f"{', '.join(REMAT_CHOICES)}, not {self.remat!r}"),
        (0 <= self.label_smooth < 1, "label_smooth must be in [0, 1)"),
    ]


@dataclasses.dataclass(frozen=True)
class VAETrainConfig(RunConfig):
  """A tokenizer training run.

  The loss is VQGAN's: reconstruction (L1 and/or L2), the quantizer's
  commitment/codebook term, and optionally LPIPS and a PatchGAN hinge loss
  with the adaptive weight, switched on at `disc_start`.
  """

  KIND = "tokenizer training"

  # A preset name (its tokenizer), a ModelConfig or a VQVAEConfig.
  model: str | ModelConfig | VQVAEConfig = "vqvae"
  name: str | None = None  # Name in the exported config.json.
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

  def total_steps(self, steps_per_epoch: int) -> int:
    del steps_per_epoch
    return self.steps

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

  def _checks(self):
    from var_jax.models import discriminator, lpips
    res = self.vae_config().resolution
    weights = (self.l1_weight, self.l2_weight, self.vq_weight,
               self.lpips_weight, self.disc_weight)
    return super()._checks() + [
        (self.steps >= 2, "steps must be >= 2"),
        (all(w >= 0 for w in weights), "loss weights must be >= 0"),
        (self.l1_weight + self.l2_weight + self.lpips_weight > 0,
         "no reconstruction loss (l1_weight, l2_weight, lpips_weight all 0)"),
        (self.restart_every >= 0 and self.restart_threshold > 0,
         "restart_every must be >= 0 and restart_threshold > 0"),
        (self.disc_start >= 0, "disc_start must be >= 0"),
        (0 <= self.warmup < 1 and round(self.warmup * self.steps)
         < self.steps - 1, "warmup must be a fraction in [0, 1) that leaves "
         "at least 2 steps after it"),
        (self.lpips_weight == 0 or res >= lpips.MIN_RESOLUTION,
         f"LPIPS needs >= {lpips.MIN_RESOLUTION}px images, the tokenizer "
         f"works at {res}px"),
        (not self.gan or discriminator.patch_grid(res, self.disc_layers) > 0,
         f"a {self.disc_layers}-layer PatchGAN needs larger images than "
         f"{res}px; lower disc_layers"),
    ]

  def validate(self) -> None:
    super().validate()
    try:
      self.lr_at(0)
    except ValueError as e:
      raise UserError(f"bad {self.KIND} config: {e}") from None
    if self.lpips_weights and self.lpips_weight <= 0:
      raise UserError("LPIPS weights were given but the config's "
                      "lpips_weight is 0: set lpips_weight to use them")
    if self.lpips_weight > 0 and not self.lpips_weights:
      raise UserError(f"lpips_weight={self.lpips_weight} needs VGG weights: "
                      "pass --lpips-weights FILE.npz or VGG16.pth,LPIPS_VGG.pth"
                      " (see var_jax/convert/lpips.py)")


def _exec_file(ref: str) -> types.ModuleType:
  """Runs a config file (local or `gs://...`) as a fresh module."""
  path = as_path(ref)
  try:
    is_file, is_dir = path.is_file(), path.is_dir()
  except OSError as e:  # e.g. gs:// without a network.
    raise UserError(f"cannot read config {ref}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}") from None
  if is_dir:
    raise UserError(f"config {ref} is a directory, not a config file")
  if not is_file:
    raise UserError(f"config file not found: {ref}")
  name = f"_var_jax_config_{path.stem}"
  mod = types.ModuleType(name)
  mod.__file__ = str(path)
  sys.modules[name] = mod  # Dataclasses in the file look their module up.
  try:
    exec(compile(path.read_text(), str(path), "exec"), mod.__dict__)  # noqa: S102
  except (Exception, SystemExit) as e:  # The user's file: one line.
    raise UserError(f"cannot load config {ref}: {type(e).__name__}: {e}"
                    ) from None
  finally:
    sys.modules.pop(name, None)
  return mod


def load_config(ref: str, cls: type = TrainConfig):
  """`get_config()` of a config file, or of a bundled `var_jax.configs` module.

  Args:
    ref: a path to a .py file (local or `gs://`), or a bundled name with or
      without its prefix ('train_d16' / 'd16'; 'train_vae_digits').
    cls: `TrainConfig` or `VAETrainConfig`, what `get_config()` must return.

  Raises:
    UserError: no such file or bundled config, the file fails, or it returns
      something else than `cls`.
  """
  prefix, example = (("train_vae_", "train_vae_digits")
                     if cls is VAETrainConfig else ("train_", "train_d16"))
  if ref.endswith(".py") or not is_local(ref) or as_path(ref).exists():
    mod = _exec_file(ref)
  else:
    mod = None
    for name in (ref, f"{prefix}{ref}"):
      try:
        mod = importlib.import_module(f"var_jax.configs.{name}")
        break
      except ModuleNotFoundError:
        continue
    if mod is None:
      raise UserError(f"config {ref!r} is neither a file nor a bundled config "
                      f"(e.g. {example})")
  if not hasattr(mod, "get_config"):
    raise UserError(f"config {ref} defines no get_config()")
  try:
    cfg = mod.get_config()
  except UserError:
    raise
  except (Exception, SystemExit) as e:  # The user's code: reported as theirs.
    msg = str(e).splitlines()[0] if str(e) else ""
    raise UserError(f"config {ref}: get_config() failed: "
                    f"{type(e).__name__}{': ' + msg if msg else ''}") from None
  if not isinstance(cfg, cls):
    raise UserError(f"config {ref}: get_config() returned "
                    f"{type(cfg).__name__}, not {cls.__name__}")
  return cfg
