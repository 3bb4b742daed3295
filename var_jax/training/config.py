"""Training configuration: one frozen dataclass, loaded from a Python file.

A config file (e.g. `configs/train_d16.py`) defines `get_config()` returning
a `TrainConfig`. Field names follow the official `utils/arg_util.py` where
one exists (its flag in brackets).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pathlib

from var_jax.errors import UserError
from var_jax.config import ModelConfig, get_preset


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training run, except where it runs."""

  model: str | ModelConfig = "d16"  # A preset name or a ModelConfig.
  data: str = "tfds:imagenet2012"  # folder:PATH | tfds:NAME | digits.
  global_batch: int = 768  # Examples per optimizer step [bs].
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
  # Progressive training [pg, pg0, pgwp]; pgwp None = epochs / 300.
  pg: float = 0.0
  pg0: int = 4
  pgwp: float | None = None
  # Initialisation [alng] and regularisation.
  adaln_gamma: float = 1e-5
  drop_path_rate: float | None = None  # None: the preset's (0.1 * depth / 24).
  cond_drop_rate: float = 0.1
  # Numerics: 'bfloat16' matmuls stand in for the official fp16 autocast.
  dtype: str = "bfloat16"
  # Data [hflip, mid_reso].
  hflip: bool = False
  mid_reso: float = 1.125
  data_workers: int | None = None
  tfds_data_dir: str | None = None
  seed: int = 0
  # Checkpoints and logs.
  ckpt_every: int = 1000
  keep_ckpts: int = 3
  log_every: int = 1
  # Weights: a tokenizer directory, or a full model directory to start from.
  vae_ckpt: str | None = None
  init_ckpt: str | None = None

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

  def validate(self) -> None:
    """Raises UserError naming the first field with an impossible value."""
    checks = [
        (self.global_batch >= 1, "global_batch must be >= 1"),
        (self.steps is None or self.steps >= 1, "steps must be >= 1"),
        (self.epochs >= 1, "epochs must be >= 1"),
        (self.grad_accum >= 1, "grad_accum must be >= 1"),
        (self.dtype in ("float32", "bfloat16"),
         f"dtype must be float32 or bfloat16, not {self.dtype!r}"),
        (self.ckpt_every >= 1 and self.keep_ckpts >= 1,
         "ckpt_every and keep_ckpts must be >= 1"),
        (0 <= self.label_smooth < 1, "label_smooth must be in [0, 1)"),
        (self.log_every >= 1, "log_every must be >= 1"),
    ]
    for ok, msg in checks:
      if not ok:
        raise UserError(f"bad training config: {msg}")


def load_config_object(ref: str, prefix: str, cls: type, example: str):
  """`get_config()` of a config file, or of a bundled `var_jax.configs` module.

  Args:
    ref: a path to a .py file, or a bundled module name with or without
      `prefix` (e.g. 'train_d16' or 'd16' for prefix 'train_').
    prefix: the bundled modules' name prefix.
    cls: the class `get_config()` must return.
    example: a bundled name, for the error message.
  """
  path = pathlib.Path(ref)
  if ref.endswith(".py") or path.exists():
    if not path.is_file():
      raise UserError(f"config file not found: {ref}")
    spec = importlib.util.spec_from_file_location(
        f"_var_jax_config_{prefix}{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(mod)
    except Exception as e:  # The user's file: report its error in one line.
      raise UserError(f"cannot load config {ref}: {type(e).__name__}: {e}"
                      ) from None
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
  cfg = mod.get_config()
  if not isinstance(cfg, cls):
    raise UserError(f"config {ref}: get_config() returned "
                    f"{type(cfg).__name__}, not {cls.__name__}")
  return cfg


def load_config(ref: str) -> TrainConfig:
  """A TrainConfig from a file path or a bundled name ('train_d16' / 'd16')."""
  return load_config_object(ref, "train_", TrainConfig, "train_d16")
