"""The VAR training loop: data -> sharded step -> metrics -> checkpoints.

Every input of a step is a function of (config, step): the loader is
deterministic per step, the PRNG key is fold_in(seed, step), and lr, wd and
the progressive-training weights come from the schedules. A run resumed
from a checkpoint therefore repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import time

import jax
import numpy as np

from var_jax import checkpoint
from var_jax.errors import UserError
from var_jax.config import ModelConfig
from var_jax.training import flops as flops_lib
from var_jax.training import loss as loss_lib
from var_jax.training import mesh as mesh_lib
from var_jax.training import metrics as metrics_lib
from var_jax.training import optimizer as opt_lib
from var_jax.training import schedule, sharding
from var_jax.training import state as state_lib
from var_jax.training import train_step as step_lib
from var_jax.training.checkpointing import (RunCheckpoints,
                                             export_model_dir, restore_tree,
                                             restore_vae)
from var_jax.training.config import TrainConfig

# Test hook: SIGKILL this process right after starting the save of this step.
_FAULT_ENV = "VAR_JAX_FAULT_KILL_AT_STEP"


@dataclasses.dataclass(frozen=True)
class Sources:
  """Where the run's weights come from (resolved, nothing loaded yet)."""

  cfg: ModelConfig
  vae_dir: pathlib.Path
  var_dir: pathlib.Path | None  # Starting VAR weights (--init-ckpt).


def resolve_sources(cfg: TrainConfig) -> Sources:
  """The model config and weight directories named by the config."""
  model_cfg = cfg.model_config()
  if cfg.init_ckpt:
    d = pathlib.Path(cfg.init_ckpt)
    mcfg = checkpoint.load_config(d)
    if mcfg.var is None or not (d / "var").exists() or not (d / "vae").exists():
      raise UserError(f"{d} is not a full model directory (tokenizer + VAR); "
                      "--init-ckpt needs both")
    # The checkpoint decides the architecture; the run decides dropout.
    var_cfg = dataclasses.replace(
        mcfg.var, cond_drop_rate=model_cfg.var.cond_drop_rate,
        drop_path_rate=model_cfg.var.drop_path_rate)
    return Sources(dataclasses.replace(mcfg, var=var_cfg), d, d)
  if not cfg.vae_ckpt:
    raise UserError("training needs a tokenizer: pass --vae-ckpt DIR (a model "
                    "directory from `var-jax convert --vae ...`) or "
                    "--init-ckpt DIR")
  d = pathlib.Path(cfg.vae_ckpt)
  vcfg = checkpoint.load_config(d)
  if vcfg.vae is None or not (d / "vae").exists():
    raise UserError(f"{d} holds no tokenizer weights")
  var = model_cfg.var
  if (vcfg.vae.vocab_size, vcfg.vae.z_channels) != (var.vocab_size, var.cvae) \
      or len(vcfg.vae.v_patch_nums) != len(var.patch_nums):
    raise UserError(
        f"tokenizer {d} (vocab {vcfg.vae.vocab_size}, "
        f"{vcfg.vae.z_channels} channels, {len(vcfg.vae.v_patch_nums)} "
        f"scales) does not fit model {model_cfg.name} (vocab "
        f"{var.vocab_size}, {var.cvae} channels, {len(var.patch_nums)} "
        "scales)")
  # Tokenizer weights do not depend on the scale list; the VAR's decides.
  vae_cfg = dataclasses.replace(vcfg.vae, v_patch_nums=var.patch_nums)
  return Sources(dataclasses.replace(model_cfg, vae=vae_cfg), d, None)


def _run_meta(cfg: TrainConfig, model_cfg: ModelConfig, total: int) -> dict:
  return {"model": model_cfg.name, "global_batch": cfg.global_batch,
          "seed": cfg.seed, "total_steps": total,
          "grad_accum": cfg.grad_accum, "data": cfg.data}


class Trainer:
  """Builds everything for one run; `run()` trains to the end."""

  def __init__(self, cfg: TrainConfig, workdir, *, mesh_spec: str | None = None):
    cfg.validate()
    self.cfg = cfg
    self.workdir = pathlib.Path(workdir)
    self.is_main = jax.process_index() == 0
    self.mesh = mesh_lib.make_mesh(mesh_spec)
    mesh_lib.check_batch(self.mesh, cfg.global_batch, cfg.grad_accum)
    src = resolve_sources(cfg)
    self.model_cfg = src.cfg
    var_cfg = self.model_cfg.var
    self.ckpts = RunCheckpoints(self.workdir, every=cfg.ckpt_every,
                                keep=cfg.keep_ckpts)
    self.start = self.ckpts.latest_step() or 0
    from var_jax.data import make_loader  # Heavy (grain, PIL): import late.
    self.loader = make_loader(
        cfg.data, split="train", resolution=self.model_cfg.vae.resolution,
        global_batch=cfg.global_batch, seed=cfg.seed, hflip=cfg.hflip,
        process_index=jax.process_index(),
        process_count=jax.process_count(), start_step=self.start,
        num_workers=cfg.data_workers, data_dir=cfg.tfds_data_dir,
        mid_reso=cfg.mid_reso)
    if self.loader.num_classes > var_cfg.num_classes:
      raise UserError(f"{cfg.data} has {self.loader.num_classes} classes but "
                      f"the model has {var_cfg.num_classes}")
    if self.loader.yields_tokens and tuple(
        self.loader.source.patch_nums) != tuple(var_cfg.patch_nums):
      raise UserError(f"{cfg.data} was tokenized at scales "
                      f"{self.loader.source.patch_nums}, the model uses "
                      f"{var_cfg.patch_nums}")
    self.total = cfg.total_steps(self.loader.steps_per_epoch)
    if self.start > self.total:
      raise UserError(f"{self.ckpts.dir} is at step {self.start}, past the "
                      f"run's {self.total} steps")
    self.meta = _run_meta(cfg, self.model_cfg, self.total)

    self.tx = opt_lib.make_optimizer(var_cfg, clip=cfg.clip)
    self.spec = state_lib.var_state_spec(var_cfg, self.tx, self.mesh)
    if self.start:
      self.state = self.ckpts.restore(self.start, self.spec.target, self.meta)
    elif src.var_dir is not None:
      params = restore_tree(src.var_dir / "var", self.spec.target["params"],
                            "the initial VAR")
      self.state = state_lib.state_from_params(self.spec, self.tx, params)
    else:
      self.state = state_lib.init_state(self.spec, var_cfg, self.tx,
                                        seed=cfg.seed,
                                        adaln_gamma=cfg.adaln_gamma)
    self.vae_gd, self.vae_state, vae_sh = restore_vae(
        src.vae_dir, self.model_cfg.vae, self.mesh)
    self.step_fn = step_lib.make_train_step(
        self.model_cfg, self.spec, self.vae_gd, vae_sh, self.tx, self.mesh,
        step_lib.StepOptions(label_smooth=cfg.label_smooth, dtype=cfg.dtype,
                             tokens=self.loader.yields_tokens,
                             grad_accum=cfg.grad_accum))
    self.key = np.asarray(jax.random.key_data(jax.random.key(cfg.seed)))
    self._peak = flops_lib.device_peak(jax.devices()[0], cfg.dtype)
    self._flops = None  # Computed on first use, only if the peak is known.

  # ------------------------------------------------------------ schedules
  def step_hparams(self, step: int):
    """(lr, wd, token weights, progressive stage) of `step`."""
    cfg, total = self.cfg, self.total
    wp_it = cfg.warmup_steps(total)
    lr, wd = schedule.lr_wd(
        cfg.schedule_type, step, peak_lr=cfg.peak_lr, wd=cfg.wd,
        wd_end=cfg.wd if cfg.wd_end is None else cfg.wd_end, wp_it=wp_it,
        max_it=total, wp0=cfg.wp0, wpe=cfg.wpe)
    w_L, prog_si = loss_lib.step_loss_weights(
        step, patch_nums=self.model_cfg.var.patch_nums, pg=cfg.pg,
        pg0=cfg.pg0, wp_it=wp_it, max_it=total,
        prog_wp_it=cfg.prog_warmup_steps(total))
    return lr, wd, w_L, prog_si

  def _step_flops(self) -> float:
    tok = 0.0 if self.loader.yields_tokens else (flops_lib.tokenizer_flops(
        self.vae_gd, self.vae_state, self.model_cfg.vae.resolution) or 0.0)
    return (flops_lib.var_train_flops(self.model_cfg.var, self.cfg.global_batch)
            + tok * self.cfg.global_batch)

  def _mfu(self, step_s: float):
    if self._peak is None or step_s <= 0:
      return "n/a"
    if self._flops is None:
      self._flops = self._step_flops()
    return self._flops / step_s / (self._peak * jax.device_count())

  # ------------------------------------------------------------ loop
  def run(self) -> dict:
    """Trains from the resume point to the end; returns the last metrics."""
    cfg = self.cfg
    writer = metrics_lib.MetricsWriter(self.workdir, enabled=self.is_main,
                                       total_steps=self.total,
                                       start_step=self.start)
    fault = int(os.environ.get(_FAULT_ENV, "-1"))
    writer.note(f"[train] {self.model_cfg.name}: steps {self.start}->"
                f"{self.total}, global batch {cfg.global_batch}, mesh "
                f"{dict(self.mesh.shape)}, {jax.process_count()} process(es), "
                f"{cfg.dtype}")
    pending, last = None, {}
    t_prev = time.perf_counter()
    try:
      for step in range(self.start, self.total):
        batch = sharding.put_batch(next(self.loader), self.mesh)
        lr, wd, w_L, prog_si = self.step_hparams(step)
        self.state, m = self.step_fn(
            self.state, self.vae_state, batch,
            *step_lib.step_inputs(lr, wd, w_L, step), self.key)
        # Read the previous step's metrics now: the device is already busy
        # with this one, so logging never stalls the pipeline.
        if pending is not None:
          last = self._log(writer, *pending)
        now = time.perf_counter()
        pending = (step, m, prog_si, now - t_prev, step == self.start)
        t_prev = now
        saved = self.ckpts.maybe_save(step + 1, self.state, self.meta,
                                      force=step + 1 == self.total)
        if saved and step + 1 == fault:
          os.kill(os.getpid(), signal.SIGKILL)
      if pending is not None:
        last = self._log(writer, *pending)
      self.ckpts.wait()
      self._export(writer)
    finally:
      writer.close()
      self.loader.close()
      self.ckpts.close()
    return last

  def _log(self, writer, step, m, prog_si, dt, first) -> dict:
    flat = metrics_lib.flatten(jax.device_get(m), self.model_cfg.var.patch_nums)
    metrics_lib.check_finite(step, flat)
    if step % self.cfg.log_every == 0 or step + 1 == self.total:
      # The first step's time includes compilation: no throughput for it.
      flat.update(img_per_s=0.0 if first else self.cfg.global_batch / dt,
                  step_s=dt, mfu="n/a" if first else self._mfu(dt),
                  prog_si=prog_si)
      writer.write(step, flat)
    writer.advance()
    return flat

  def _export(self, writer) -> None:
    """Writes `workdir/model`, a model directory `var-jax sample` can load."""
    out = self.workdir / "model"
    export_model_dir(out, self.model_cfg, self.vae_state,
                     self.state["params"])
    writer.note(f"[train] done; model directory {out}")


def train(cfg: TrainConfig, workdir, *, mesh_spec: str | None = None) -> dict:
  """Runs (or resumes) a training run; returns the last step's metrics."""
  return Trainer(cfg, workdir, mesh_spec=mesh_spec).run()
