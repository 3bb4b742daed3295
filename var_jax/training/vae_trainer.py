"""The tokenizer training loop: data -> sharded step -> metrics -> checkpoints.

Like the VAR trainer, every input of a step is a function of (config, step):
the loader is deterministic per step, the PRNG key is fold_in(seed, step)
and the learning rates come from the schedule, so a run resumed from a
checkpoint repeats the uninterrupted run exactly. At the end the tokenizer
is exported as a model directory (`config.json` + `vae/`) that `var-jax
train --vae-ckpt`, `tokenize` and the sampler read.
"""

from __future__ import annotations

import os
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.errors import UserError
from var_jax.training import mesh as mesh_lib
from var_jax.training import metrics as metrics_lib
from var_jax.training import sharding
from var_jax.training import vae_step
from var_jax.training.checkpointing import RunCheckpoints, export_model_dir
from var_jax.training.vae_config import VAETrainConfig

# Test hook shared with the VAR trainer: SIGKILL right after starting the
# save of this step.
_FAULT_ENV = "VAR_JAX_FAULT_KILL_AT_STEP"


def _run_meta(cfg: VAETrainConfig, name: str) -> dict:
  return {"model": name, "global_batch": cfg.global_batch, "seed": cfg.seed,
          "total_steps": cfg.steps, "grad_accum": 1, "data": cfg.data,
          "kind": "vqvae"}


def flatten(metrics: dict, patch_nums) -> dict[str, float]:
  """Host metrics -> flat floats; per-scale arrays become `usage_s{pn}` etc."""
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    if k.startswith("scale_"):
      for pn, x in zip(patch_nums, v.reshape(-1)):
        out[f"{k[len('scale_'):]}_s{pn}"] = float(x)
    else:
      out[k] = float(v)
  return out


def load_lpips(cfg: VAETrainConfig):
  """The LPIPS weights the config asks for, or {} when LPIPS is off."""
  if cfg.lpips_weight <= 0:
    return {}
  from var_jax.models.lpips import LpipsWeightsError, load_lpips_weights
  try:
    return load_lpips_weights(cfg.lpips_weights)
  except LpipsWeightsError as e:
    raise UserError(str(e)) from None


class VAETrainer:
  """Builds everything for one tokenizer run; `run()` trains to the end."""

  def __init__(self, cfg: VAETrainConfig, workdir, *,
               mesh_spec: str | None = None):
    cfg.validate()
    self.cfg = cfg
    # Weights files first: a bad path fails before any slow set-up.
    lpips_np = load_lpips(cfg)
    self.workdir = pathlib.Path(workdir)
    self.is_main = jax.process_index() == 0
    self.mesh = mesh_lib.make_mesh(mesh_spec)
    mesh_lib.check_batch(self.mesh, cfg.global_batch)
    self.model_cfg = cfg.model_config()
    self.vae_cfg = self.model_cfg.vae
    self.ckpts = RunCheckpoints(self.workdir, every=cfg.ckpt_every,
                                keep=cfg.keep_ckpts)
    self.start = self.ckpts.latest_step() or 0
    if self.start > cfg.steps:
      raise UserError(f"{self.ckpts.dir} is at step {self.start}, past the "
                      f"run's {cfg.steps} steps")
    from var_jax.data import make_loader  # Heavy (grain, PIL): import late.
    self.loader = make_loader(
        cfg.data, split="train", resolution=self.vae_cfg.resolution,
        global_batch=cfg.global_batch, seed=cfg.seed, hflip=cfg.hflip,
        process_index=jax.process_index(),
        process_count=jax.process_count(), start_step=self.start,
        num_workers=cfg.data_workers, data_dir=cfg.tfds_data_dir,
        mid_reso=cfg.mid_reso)
    if self.loader.yields_tokens:
      raise UserError(f"{cfg.data} holds tokens; tokenizer training needs "
                      "images")
    self.eval_loader = None
    if cfg.eval_split:  # Opened now: a bad split fails before training.
      mesh_lib.check_batch(self.mesh, cfg.eval_batch)
      self.eval_loader = make_loader(
          cfg.data, split=cfg.eval_split, resolution=self.vae_cfg.resolution,
          global_batch=cfg.eval_batch, seed=0, shuffle=False, num_epochs=1,
          process_index=jax.process_index(),
          process_count=jax.process_count(), num_workers=cfg.data_workers,
          data_dir=cfg.tfds_data_dir, mid_reso=cfg.mid_reso)
    self.meta = _run_meta(cfg, self.model_cfg.name)
    self.spec, self.tx, self.dtx = vae_step.build(cfg, self.mesh)
    if self.start:
      self.state = self.ckpts.restore(self.start, self.spec.target, self.meta)
    else:
      self.state = vae_step.init_state(self.spec, cfg, self.tx, self.dtx,
                                       seed=cfg.seed)
    self.lpips_w = jax.device_put(lpips_np, sharding.replicated(self.mesh))
    self._steps = {}  # gan on/off -> compiled step, built on first use.
    self.key = np.asarray(jax.random.key_data(jax.random.key(cfg.seed)))

  def step_fn(self, step: int):
    gan = self.cfg.gan_at(step)
    if gan not in self._steps:
      self._steps[gan] = vae_step.make_vae_step(
          self.spec, self.cfg, self.tx, self.dtx, self.mesh, gan=gan)
    return self._steps[gan]

  def run(self) -> dict:
    """Trains from the resume point to the end; returns the last metrics."""
    cfg = self.cfg
    writer = metrics_lib.MetricsWriter(self.workdir, enabled=self.is_main,
                                       total_steps=cfg.steps,
                                       start_step=self.start)
    fault = int(os.environ.get(_FAULT_ENV, "-1"))
    extras = [n for n, on in (("lpips", cfg.lpips_weight > 0),
                              (f"gan from step {cfg.disc_start}", cfg.gan),
                              (f"restart every {cfg.restart_every}",
                               cfg.restart_every > 0)) if on]
    writer.note(f"[train-vae] {self.model_cfg.name}: steps {self.start}->"
                f"{cfg.steps}, global batch {cfg.global_batch}, "
                f"{self.vae_cfg.resolution}px, mesh {dict(self.mesh.shape)}, "
                f"{jax.process_count()} process(es), {cfg.dtype}"
                + (f", {', '.join(extras)}" if extras else ""))
    pending, last = None, {}
    t_prev = time.perf_counter()
    try:
      for step in range(self.start, cfg.steps):
        batch = next(self.loader)
        batch = sharding.put_batch({"images": batch["images"]}, self.mesh)
        lr, dlr = cfg.lr_at(step)
        self.state, m = self.step_fn(step)(
            self.state, batch, self.lpips_w,
            *vae_step.step_inputs(lr, dlr, step), self.key)
        # Read the previous step's metrics while this one runs.
        if pending is not None:
          self._write(writer, pending[0], self._checked(*pending[:2]),
                      *pending[2:])
        now = time.perf_counter()
        pending = (step, m, now - t_prev, step == self.start)
        t_prev = now
        saved = self.ckpts.maybe_save(step + 1, self.state, self.meta,
                                      force=step + 1 == cfg.steps)
        if saved and step + 1 == fault:
          os.kill(os.getpid(), signal.SIGKILL)
      if pending is not None:
        step, m, dt, first = pending
        last = self._checked(step, m)  # Never export a diverged model.
      self._export(writer)
      if self.eval_loader is not None:
        # The held-out PSNR joins the last step's record.
        last["val_psnr"] = self._evaluate(writer)
      if pending is not None:
        self._write(writer, step, last, dt, first)
      self.ckpts.wait()
    finally:
      writer.close()
      self.loader.close()
      if self.eval_loader is not None:
        self.eval_loader.close()
      self.ckpts.close()
    return last

  def _checked(self, step, m) -> dict:
    flat = flatten(jax.device_get(m), self.vae_cfg.v_patch_nums)
    metrics_lib.check_finite(step, flat)
    return flat

  def _write(self, writer, step, flat, dt, first) -> None:
    if step % self.cfg.log_every == 0 or step + 1 == self.cfg.steps:
      # The first step's time includes compilation: no throughput for it.
      flat.update(img_per_s=0.0 if first else self.cfg.global_batch / dt,
                  step_s=dt)
      writer.write(step, flat)
    writer.advance()

  def _export(self, writer) -> None:
    """Writes `workdir/model`, a tokenizer-only model directory."""
    out = self.workdir / "model"
    export_model_dir(out, self.model_cfg, vae_step.vae_tree(self.state), None)
    writer.note(f"[train-vae] done; tokenizer model directory {out}")

  def _evaluate(self, writer) -> float:
    """Mean per-image PSNR on `eval_split`, through the inference path
    (encode -> token ids' f_hat -> decode, clipped), as the sampler sees it."""
    from flax import nnx
    cfg, gd, loader = self.cfg, self.spec.graphdef, self.eval_loader

    @jax.jit
    def psnr_sum(params, buffers, x_BHWC):
      vae = nnx.merge(gd, params, buffers)
      rec = vae.decode(vae.img_to_fhats(x_BHWC)[-1])
      mse_B = jnp.mean(((rec - x_BHWC) / 2) ** 2, axis=(1, 2, 3))
      return jnp.sum(-10.0 * jnp.log10(jnp.maximum(mse_B, 1e-10)))

    total, n = 0.0, 0
    for batch in loader:
      x = sharding.put_batch({"images": batch["images"]}, self.mesh)
      total += float(psnr_sum(self.state["params"], self.state["buffers"],
                              x["images"]))
      n += cfg.eval_batch
    value = total / n
    writer.note(f"[train-vae] {cfg.eval_split} reconstruction PSNR "
                f"{value:.2f} dB over {n} images")
    return value


def train_vae(cfg: VAETrainConfig, workdir, *,
              mesh_spec: str | None = None) -> dict:
  """Runs (or resumes) a tokenizer run; returns the last step's metrics."""
  return VAETrainer(cfg, workdir, mesh_spec=mesh_spec).run()
