"""VAR training: the task `run.Run` trains (`var-jax train`).

What is VAR-specific: where the weights come from (a tokenizer directory,
or a full model directory to start from), the optimizer and its schedules
(lr, wd, progressive-training token weights per step), the jitted step over
the frozen tokenizer, MFU, the held-out loss and accuracy after training,
and a model directory holding both models.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from var_jax import checkpoint, hardware
from var_jax.models.abstract import abstract_split
from var_jax.models.var.config import ModelConfig, check_compatible
from var_jax.models.var.transformer import VAR
from var_jax.errors import DataError, UserError
from var_jax.training import flops as flops_lib
from var_jax.training import loss as loss_lib
from var_jax.training import metrics as metrics_lib
from var_jax.training import optimizer as opt_lib
from var_jax.training import run as run_lib
from var_jax.training import schedule
from var_jax.training import sharding
from var_jax.training import state as state_lib
from var_jax.training import train_step as step_lib
from var_jax.training.checkpointing import restore_tree, restore_vae
from var_jax.training.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Sources:
  """Where the run's weights come from (resolved, nothing loaded yet)."""

  cfg: ModelConfig
  vae_dir: object  # epath.Path
  var_dir: object | None  # Starting VAR weights (--init-ckpt).


def resolve_sources(cfg: TrainConfig) -> Sources:
  """The model config and weight directories named by the config.

  `vae_ckpt` and `init_ckpt` are model directories or model names
  (`checkpoint.model_dir`: digits, digits_refiner, d16..d36), as every
  command's `--ckpt` takes them.

  Raises:
    UserError: no tokenizer named, or a directory without the weights the
      run needs.
    IncompatibleModelsError: a tokenizer that does not fit the model.
  """
  model_cfg = cfg.model_config()
  if cfg.init_ckpt:
    # The name itself to load_config: a misspelt one is refused by name.
    mcfg = checkpoint.load_config(cfg.init_ckpt)
    d = checkpoint.model_dir(cfg.init_ckpt)
    if mcfg.var is None or not (d / "var").exists() or not (d / "vae").exists():
      raise UserError(f"{d} is not a full model directory (tokenizer + VAR); "
                      "--init-ckpt needs both")
    # The checkpoint decides the architecture; the run decides dropout.
    var_cfg = dataclasses.replace(
        mcfg.var, cond_drop_rate=model_cfg.var.cond_drop_rate,
        drop_path_rate=model_cfg.var.drop_path_rate)
    return Sources(dataclasses.replace(mcfg, var=var_cfg), d, d)
  if not cfg.vae_ckpt:
    raise UserError("training needs a tokenizer: pass --vae-ckpt DIR_OR_NAME "
                    "(a model directory from `var-jax convert --vae ...` or "
                    "`train-vae`, or a model name) or --init-ckpt "
                    "DIR_OR_NAME")
  vcfg = checkpoint.load_config(cfg.vae_ckpt)
  d = checkpoint.model_dir(cfg.vae_ckpt)
  if vcfg.vae is None or not (d / "vae").exists():
    raise UserError(f"{d} holds no tokenizer weights")
  var, vae_cfg = model_cfg.var, vcfg.vae
  # Tokenizer weights do not depend on the scale list: one trained on as
  # many scales serves the VAR's list; another count is refused below.
  if len(vae_cfg.v_patch_nums) == len(var.patch_nums):
    vae_cfg = dataclasses.replace(vae_cfg, v_patch_nums=var.patch_nums)
  check_compatible(vae_cfg, var,
                   where=f"tokenizer {d} and model {model_cfg.name}")
  return Sources(dataclasses.replace(model_cfg, vae=vae_cfg), d, None)


def token_cache_differences(src, model_cfg: ModelConfig,
                            tokenizer: str | None = None) -> list[str]:
  """What of a token cache (`data.sources.TokenSource`) the model cannot take.

  Returns one '<field> <cache's> in the cache, <model's> in the model' per
  differing field: `patch_nums` must be equal, `vocab_size` equal (caches
  written before it was stored: every token id below the model's), the
  cache's `num_classes` at most the model's (as for image data), and the
  fingerprint of the tokenizer that wrote the cache equal to `tokenizer`,
  the run's (when both are known).
  """
  var, out = model_cfg.var, []
  if tokenizer and src.tokenizer and src.tokenizer != tokenizer:
    out.append(f"tokenizer {src.tokenizer} in the cache, {tokenizer} in the "
               "model (the cache was made with other tokenizer weights; "
               "tokenize again with this run's tokenizer)")
  if tuple(src.patch_nums) != tuple(var.patch_nums):
    out.append(f"patch_nums {tuple(src.patch_nums)} in the cache, "
               f"{tuple(var.patch_nums)} in the model")
  vocab = model_cfg.vae.vocab_size
  if src.vocab_size is None:
    top = int(src.tokens_NL.max()) if src.tokens_NL.size else -1
    if top >= vocab:
      out.append(f"vocab_size: token ids up to {top} in the cache (written "
                 f"without its vocab_size), {vocab} in the model")
  elif src.vocab_size != vocab:
    out.append(f"vocab_size {src.vocab_size} in the cache, {vocab} in the "
               "model")
  if src.num_classes > var.num_classes:
    out.append(f"num_classes {src.num_classes} in the cache, "
               f"{var.num_classes} in the model")
  return out


def unsplit_warning(cfg, mesh) -> list[str]:
  """A line when the mesh's fsdp ways do not divide the model's weights, so
  that they stay whole on every device; none otherwise."""
  nbytes, count = sharding.unsplit_weights(
      abstract_split(VAR, cfg)[1], mesh)
  if not count:
    return []
  return [f"{count} weight arrays ({nbytes / 2 ** 30:.2f} GiB) stay whole on "
          f"every device: the mesh {dict(mesh.shape)} does not divide their "
          f"dimensions (width {cfg.embed_dim}); fsdp ways that divide "
          f"{cfg.embed_dim} split them"]


class VARTask(run_lib.Task):
  """VAR's state, step and model directory for `run.Run`."""

  command = "train"

  def __init__(self, cfg: TrainConfig, mesh):
    self.cfg, self.mesh = cfg, mesh
    self.eval_loader = None
    self.src = resolve_sources(cfg)
    self.model_cfg = self.src.cfg
    self.patch_nums = self.model_cfg.var.patch_nums
    self.tx = opt_lib.make_optimizer(self.model_cfg.var, clip=cfg.clip)
    self.spec = state_lib.var_state_spec(self.model_cfg.var, self.tx, mesh)
    self.vae_gd, self.vae_state, self._vae_sh = restore_vae(
        self.src.vae_dir, self.model_cfg.vae, mesh)
    self.key = np.asarray(jax.random.key_data(jax.random.key(cfg.seed)))
    self._peak = hardware.device_peak(jax.devices()[0], cfg.dtype)
    self._flops = None  # Computed on first use, only if the peak is known.

  def attach(self, loader, total: int) -> None:
    """Checks the data against the model; compiles nothing yet."""
    var_cfg, cfg = self.model_cfg.var, self.cfg
    self.tokens = loader.yields_tokens
    if self.tokens:
      from var_jax.training.tokenize import tokenizer_fingerprint
      diff = token_cache_differences(
          loader.source, self.model_cfg,
          tokenizer_fingerprint(sharding.to_host(self.vae_state)))
      if diff:
        raise DataError(f"token cache {cfg.data} does not fit model "
                        f"{self.model_cfg.name}: {'; '.join(diff)}")
    if loader.num_classes > var_cfg.num_classes:
      raise DataError(f"{cfg.data} has {loader.num_classes} classes but the "
                      f"model has {var_cfg.num_classes}")
    self.total = total
    self.batch_keys = ("tokens" if self.tokens else "images", "labels")
    self.step_fn = step_lib.make_train_step(
        self.model_cfg, self.spec, self.vae_gd, self._vae_sh, self.tx,
        self.mesh, step_lib.StepOptions(
            label_smooth=cfg.label_smooth, dtype=cfg.dtype, tokens=self.tokens,
            grad_accum=cfg.grad_accum, remat=cfg.remat))
    # Opened now: a bad split or batch fails before training.
    self.eval_loader = run_lib.open_eval_loader(
        cfg, self.model_cfg.vae.resolution, self.mesh, loader)

  def init_state(self) -> dict:
    if self.src.var_dir is not None:
      params = restore_tree(self.src.var_dir / "var",
                            self.spec.target["params"], "the initial VAR")
      return state_lib.state_from_params(self.spec, self.tx, params)
    return state_lib.init_state(self.spec, self.model_cfg.var, self.tx,
                                seed=self.cfg.seed,
                                adaln_gamma=self.cfg.adaln_gamma)

  def warnings(self) -> list[str]:
    return unsplit_warning(self.model_cfg.var, self.mesh)

  def step_hparams(self, step: int):
    """(lr, wd, token weights, progressive stage) of `step`."""
    cfg, total = self.cfg, self.total
    wp_it = cfg.warmup_steps(total)
    lr, wd = schedule.lr_wd(
        cfg.schedule_type, step, peak_lr=cfg.peak_lr, wd=cfg.wd,
        wd_end=cfg.wd if cfg.wd_end is None else cfg.wd_end, wp_it=wp_it,
        max_it=total, wp0=cfg.wp0, wpe=cfg.wpe)
    w_L, prog_si = loss_lib.step_loss_weights(
        step, patch_nums=self.patch_nums, pg=cfg.pg, pg0=cfg.pg0,
        wp_it=wp_it, max_it=total, prog_wp_it=cfg.prog_warmup_steps(total))
    return lr, wd, w_L, prog_si

  def step(self, state, batch, step: int):
    lr, wd, w_L, _ = self.step_hparams(step)
    return self.step_fn(state, self.vae_state, batch,
                        *step_lib.step_inputs(lr, wd, w_L, step), self.key)

  def log_extras(self, step: int, dt: float, first: bool) -> dict:
    return {"mfu": "n/a" if first else self._mfu(dt),
            "prog_si": self.step_hparams(step)[3]}

  def _mfu(self, step_s: float):
    if self._peak is None or step_s <= 0:
      return "n/a"
    if self._flops is None:
      tok = 0.0 if self.tokens else (flops_lib.tokenizer_flops(
          self.vae_gd, self.vae_state, self.model_cfg.vae.resolution) or 0.0)
      self._flops = (flops_lib.var_train_flops(self.model_cfg.var,
                                               self.cfg.global_batch)
                     + tok * self.cfg.global_batch)
    return self._flops / step_s / (self._peak * jax.device_count())

  def export_trees(self, state):
    return self.vae_state, state["params"]

  def evaluate(self, state, note) -> dict:
    """Held-out loss and accuracy on `eval_split` (eval mode, teacher
    forced, as the official `eval_ep`): `val_loss_mean`, `val_acc`, their
    last-scale `_tail` values and one per scale."""
    if self.eval_loader is None:
      return {}
    eval_fn = step_lib.make_eval_step(
        self.model_cfg, self.spec, self.vae_gd, self._vae_sh, self.mesh,
        step_lib.StepOptions(dtype=self.cfg.dtype, tokens=self.tokens))
    total = None
    for raw in self.eval_loader:
      batch = sharding.put_batch({k: raw[k] for k in self.batch_keys},
                                 self.mesh)
      sums = jax.device_get(eval_fn(state["params"], self.vae_state, batch))
      total = sums if total is None else jax.tree.map(np.add, total, sums)
    means = metrics_lib.flatten(loss_lib.finalize_metrics(total),
                                self.patch_nums)
    out = {f"val_{k}": v for k, v in means.items()}
    note(f"[train] {self.cfg.eval_split}: loss {out['val_loss_mean']:.4f}, "
         f"accuracy {out['val_acc']:.2f}% (last scale: loss "
         f"{out['val_loss_tail']:.4f}, accuracy {out['val_acc_tail']:.2f}%) "
         f"over {int(total['count'])} examples")
    return out

  def close(self) -> None:
    if self.eval_loader is not None:
      self.eval_loader.close()


def train(cfg: TrainConfig, workdir, *, mesh_spec: str | None = None) -> dict:
  """Runs (or resumes) a VAR training run; returns the last step's metrics."""
  return run_lib.run(cfg, workdir, VARTask, mesh_spec=mesh_spec)
