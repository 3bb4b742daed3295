"""Tokenizer training: the task `run.Run` trains (`var-jax train-vae`).

What is tokenizer-specific: the LPIPS weights, the generator/discriminator
state and its two compiled steps (before and after `disc_start`), and the
held-out reconstruction PSNR after training. The exported model directory
(`config.json` + `vae/`) is what `var-jax train --vae-ckpt`, `tokenize` and
the sampler read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.errors import DataError
from var_jax.models.var.vqvae import psnr
from var_jax.training import run as run_lib
from var_jax.training import sharding
from var_jax.training import vae_step
from var_jax.training.config import VAETrainConfig


def load_lpips(cfg: VAETrainConfig):
  """The LPIPS weights the config asks for, or {} when LPIPS is off."""
  if cfg.lpips_weight <= 0:
    return {}
  from var_jax.convert.lpips import load_lpips_weights
  return load_lpips_weights(cfg.lpips_weights)


class VAETask(run_lib.Task):
  """The tokenizer's state, steps and evaluation for `run.Run`."""

  command = "train-vae"
  batch_keys = ("images",)

  def __init__(self, cfg: VAETrainConfig, mesh):
    self.cfg, self.mesh = cfg, mesh
    lpips_np = load_lpips(cfg)  # A bad path fails before any slow set-up.
    self.model_cfg = cfg.model_config()
    self.patch_nums = self.model_cfg.vae.v_patch_nums
    self.eval_loader = None
    self.spec, self.tx, self.dtx = vae_step.build(cfg, mesh)
    self.lpips_w = jax.device_put(lpips_np, sharding.replicated(mesh))
    self._steps = {}  # gan on/off -> compiled step, built on first use.
    self.key = np.asarray(jax.random.key_data(jax.random.key(cfg.seed)))

  def attach(self, loader, total: int) -> None:
    del total
    cfg = self.cfg
    if loader.yields_tokens:
      raise DataError(f"{cfg.data} holds tokens; tokenizer training needs "
                      "images")
    # Opened now: a bad split or batch fails before training.
    self.eval_loader = run_lib.open_eval_loader(
        cfg, self.model_cfg.vae.resolution, self.mesh, loader)

  def init_state(self) -> dict:
    return vae_step.init_state(self.spec, self.cfg, self.tx, self.dtx,
                               seed=self.cfg.seed)

  def step(self, state, batch, step: int):
    gan = self.cfg.gan_at(step)
    if gan not in self._steps:
      self._steps[gan] = vae_step.make_vae_step(
          self.spec, self.cfg, self.tx, self.dtx, self.mesh, gan=gan)
    lr, dlr = self.cfg.lr_at(step)
    return self._steps[gan](state, batch, self.lpips_w,
                            *vae_step.step_inputs(lr, dlr, step), self.key)

  def describe(self) -> str:
    cfg = self.cfg
    extras = [n for n, on in (("lpips", cfg.lpips_weight > 0),
                              (f"gan from step {cfg.disc_start}", cfg.gan),
                              (f"restart every {cfg.restart_every}",
                               cfg.restart_every > 0)) if on]
    return (f", {self.model_cfg.vae.resolution}px"
            + (f", {', '.join(extras)}" if extras else ""))

  def export_trees(self, state):
    return vae_step.vae_tree(state), None

  def evaluate(self, state, note) -> dict:
    """Mean per-image PSNR on `eval_split` through the inference path
    (encode -> token ids' f_hat -> decode, clipped), as the sampler sees it."""
    if self.eval_loader is None:
      return {}
    gd = self.spec.graphdef

    @jax.jit
    def psnr_sum(params, buffers, x_BHWC):
      vae = nnx.merge(gd, params, buffers)
      return jnp.sum(psnr(vae.decode(vae.img_to_fhats(x_BHWC)[-1]), x_BHWC))

    total, n = 0.0, 0
    for batch in self.eval_loader:
      x = sharding.put_batch({"images": batch["images"]}, self.mesh)
      total += float(psnr_sum(state["params"], state["buffers"], x["images"]))
      n += self.cfg.eval_batch
    value = total / n
    note(f"[train-vae] {self.cfg.eval_split} reconstruction PSNR "
         f"{value:.2f} dB over {n} images")
    return {"val_psnr": value}

  def close(self) -> None:
    if self.eval_loader is not None:
      self.eval_loader.close()


def train_vae(cfg: VAETrainConfig, workdir, *,
              mesh_spec: str | None = None) -> dict:
  """Runs (or resumes) a tokenizer run; returns the last step's metrics."""
  return run_lib.run(cfg, workdir, VAETask, mesh_spec=mesh_spec)
