"""The tokenizer's training state and its jitted, donated training step.

images -> `VQVAE.__call__` (encoder, multi-scale residual quantizer with the
straight-through estimator, decoder) -> L1/L2 (+ LPIPS) reconstruction + VQ
loss (+ the PatchGAN hinge term with VQGAN's adaptive weight) -> clip +
AdamW; then the usage EMA and, every `restart_every` steps, the restart of
dead codes (`models.quantizer`). The discriminator takes its own hinge-loss
step on the same batch. Everything random derives from (seed, step), so a
resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from var_jax.models import discriminator as disc_lib
from var_jax.models.var import quantizer as q
from var_jax.models.lpips import lpips_distance
from var_jax.models.var.vqvae import VQVAE, Buffer, TrainOut, psnr
from var_jax.training import optimizer as opt_lib
from var_jax.training import sharding
from var_jax.training import state as state_lib
from var_jax.training.config import VAETrainConfig
from var_jax.training.state import StateSpec


def make_optimizer(abstract_params, *, b1: float, b2: float, clip: float
                   ) -> optax.GradientTransformation:
  """clip -> PyTorch's AdamW, lr / wd injectable; decay on kernels only."""
  mask = jax.tree.map(lambda x: len(x.shape) == 4, abstract_params)
  adamw = functools.partial(opt_lib.torch_adamw, b1=b1, b2=b2, eps=1e-8,
                            decay_mask=mask)
  return optax.chain(
      opt_lib.clip_by_global_norm_torch(clip),
      optax.inject_hyperparams(adamw, hyperparam_dtype=jnp.float32)(
          learning_rate=0.0, weight_decay=0.0))


def _modules(cfg: VAETrainConfig, seed):
  vae = VQVAE(cfg.vae_config(), rngs=nnx.Rngs(seed))
  disc = None
  if cfg.gan:
    disc = disc_lib.PatchGAN(cfg.vae_config().in_channels, cfg.disc_ndf,
                             cfg.disc_layers, rngs=nnx.Rngs(seed + 1))
  return vae, disc


def _fresh(cfg: VAETrainConfig, tx, dtx, seed) -> dict:
  vae, disc = _modules(cfg, seed)
  _, p, b = nnx.split(vae, nnx.Param, Buffer)
  params = state_lib.strong(nnx.to_pure_dict(p))
  state = {"params": params, "buffers": state_lib.strong(nnx.to_pure_dict(b)),
           "opt_state": tx.init(params)}
  if disc is not None:
    dp = state_lib.strong(nnx.to_pure_dict(nnx.state(disc)))
    state.update(disc=dp, disc_opt_state=dtx.init(dp))
  return state


def build(cfg: VAETrainConfig, mesh: Mesh):
  """(spec, generator optimizer, discriminator optimizer or None)."""
  vae, disc = nnx.eval_shape(lambda: _modules(cfg, 0))
  graphdef, p_abs, _ = nnx.split(vae, nnx.Param, Buffer)
  opt = functools.partial(make_optimizer, b1=cfg.b1, b2=cfg.b2, clip=cfg.clip)
  tx = opt(nnx.to_pure_dict(p_abs))
  groups = {"params": (p_abs, tx, "opt_state")}
  dtx = dgd = None
  if disc is not None:
    dgd, d_abs = nnx.split(disc)
    dtx = opt(nnx.to_pure_dict(d_abs))
    groups["disc"] = (d_abs, dtx, "disc_opt_state")
  abstract = jax.eval_shape(lambda: _fresh(cfg, tx, dtx, 0))
  sh = state_lib.state_shardings(abstract, mesh, groups)
  return StateSpec(graphdef, abstract, sh, disc_graphdef=dgd), tx, dtx


def init_state(spec: StateSpec, cfg: VAETrainConfig, tx, dtx, *,
               seed: int) -> dict:
  """Random initialisation, computed directly into the state's shards."""
  return state_lib.init_in_shards(spec, lambda: _fresh(cfg, tx, dtx, seed))


def vae_tree(state: dict) -> dict:
  """The full VQVAE state (params + buffers) in the model-directory layout."""
  def merge(a, b):
    out = dict(a)
    for k, v in b.items():
      out[k] = merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out
  return merge(state["params"], state["buffers"])


# ------------------------------------------------------------ model pieces
def conv_out_nobias(h_BHWC, kernel_HWIO):
  """`conv_out` without its bias: linear in the kernel (adaptive weight)."""
  return jax.lax.conv_general_dilated(
      h_BHWC, kernel_HWIO, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _cast(params: dict, dtype) -> dict:
  """Compute copies of the conv weights; the quantizer stays float32."""
  if dtype == jnp.float32:
    return params
  return {k: v if k == "quantize" else jax.tree.map(
      lambda x: x.astype(dtype), v) for k, v in params.items()}


def forward(graphdef, params, buffers, x_BHWC, dtype=jnp.float32) -> TrainOut:
  """The training forward `train-vae` differentiates (`VQVAE.__call__`).

  Args:
    graphdef: the VQVAE graph split as (Param, Buffer).
    params, buffers: float32 pure-dict states.
    x_BHWC: float (B, H, W, 3) images in [-1, 1].
    dtype: compute dtype of the convolutions (the quantizer is float32).

  Returns:
    `TrainOut` with `rec` in float32.
  """
  vae = nnx.merge(graphdef, _cast(params, dtype), buffers)
  out = vae(x_BHWC.astype(dtype))
  return out._replace(rec=out.rec.astype(jnp.float32))


# ------------------------------------------------------------ the step
def make_vae_step(spec: StateSpec, cfg: VAETrainConfig, tx, dtx,
                  mesh: Mesh, *, gan: bool) -> Callable:
  """Returns step(state, batch, lpips_w, lr, disc_lr, step, key).

  `state` is donated; `batch` holds 'images' sharded over the batch;
  `lpips_w` is the LPIPS weight tree (or {}); `lr`, `disc_lr` are float32
  scalars, `step` int32, `key` the run's base key. `gan` (static) switches
  the adversarial terms on: before `disc_start` the discriminator is left
  untouched. Returns (new state, metrics).
  """
  vae_cfg = cfg.vae_config()
  pn = vae_cfg.v_patch_nums
  dtype = jnp.dtype(cfg.dtype)
  f32 = jnp.float32
  if gan and not cfg.gan:
    raise ValueError("gan=True needs a config with disc_weight > 0")

  def fwd(params, buffers, x):
    out = forward(spec.graphdef, params, buffers, x, dtype)
    aux = (jax.lax.stop_gradient(out.f).astype(f32), out.quant.hits_SV,
           jax.lax.stop_gradient(out.h).astype(f32))
    return (out.rec, out.quant.vq_loss.astype(f32)), aux

  def rec_loss(rec, x, lpips_w):
    d = rec - x
    terms = {"l1": jnp.mean(jnp.abs(d)), "l2": jnp.mean(d * d)}
    nll = cfg.l1_weight * terms["l1"] + cfg.l2_weight * terms["l2"]
    if cfg.lpips_weight > 0:
      terms["lpips"] = jnp.mean(lpips_distance(lpips_w, x, rec, dtype))
      nll = nll + cfg.lpips_weight * terms["lpips"]
    return nll, terms

  def restart(params, ema, f, key):
    quant = nnx.merge(spec.graphdef, params, {"quantize": {
        "ema_vocab_hit_SV": ema}}).quantize
    cb, ema, n = q.restart_dead_codes(quant, f, ema, key, pn,
                                      cfg.restart_threshold)
    emb = {**params["quantize"]["embedding"], "embedding": cb}
    params = {**params, "quantize": {**params["quantize"], "embedding": emb}}
    return params, ema, n

  def step(state, batch, lpips_w, lr, disc_lr, step_i, base_key):
    key = jax.random.fold_in(base_key, step_i)
    x = batch["images"].astype(f32)
    params, buffers = state["params"], state["buffers"]
    (rec, vq), vjp_fn, (f, hits, h) = jax.vjp(
        lambda p: fwd(p, buffers, x), params, has_aux=True)
    (nll, terms), g_nll = jax.value_and_grad(rec_loss, has_aux=True)(
        rec, x, lpips_w)
    metrics = dict(terms)
    loss = nll + cfg.vq_weight * vq
    cot = g_nll
    new = dict(state)
    if gan:
      disc = nnx.merge(spec.disc_graphdef, state["disc"])
      g_loss, g_gan = jax.value_and_grad(
          lambda r: disc_lib.hinge_g_loss(disc(r.astype(dtype))))(rec)
      _, kernel_vjp = jax.vjp(lambda k: conv_out_nobias(h, k),
                              params["decoder"]["conv_out"]["kernel"])
      d_weight = cfg.disc_weight * disc_lib.adaptive_weight(
          kernel_vjp(g_nll)[0], kernel_vjp(g_gan)[0], cfg.max_d_weight)
      cot = g_nll + d_weight * g_gan
      loss = loss + d_weight * g_loss

      def d_loss_fn(dp):
        d = nnx.merge(spec.disc_graphdef, dp)
        real = d(x.astype(dtype))
        fake = d(jax.lax.stop_gradient(rec).astype(dtype))
        return disc_lib.hinge_d_loss(real, fake), (
            jnp.mean(real.astype(f32)), jnp.mean(fake.astype(f32)))

      (d_loss, (lr_m, lf_m)), d_grads = jax.value_and_grad(
          d_loss_fn, has_aux=True)(state["disc"])
      d_opt = opt_lib.set_lr_wd(state["disc_opt_state"], disc_lr, 0.0)
      d_upd, d_opt = dtx.update(d_grads, d_opt, state["disc"])
      new.update(disc=optax.apply_updates(state["disc"], d_upd),
                 disc_opt_state=d_opt)
      metrics.update(g_loss=g_loss, d_weight=d_weight, d_loss=d_loss,
                     logits_real=lr_m, logits_fake=lf_m, disc_lr=disc_lr,
                     disc_grad_norm=opt_lib.grad_norm(d_opt))
    grads = vjp_fn((cot, jnp.asarray(cfg.vq_weight, f32)))[0]
    opt_state = opt_lib.set_lr_wd(state["opt_state"], lr, cfg.wd)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = q.update_ema(buffers["quantize"]["ema_vocab_hit_SV"], hits, step_i)
    restarted = jnp.zeros((), jnp.int32)
    if cfg.restart_every:
      params, ema, restarted = jax.lax.cond(
          (step_i + 1) % cfg.restart_every == 0, restart,
          lambda p, e, *_: (p, e, jnp.zeros((), jnp.int32)),
          params, ema, f, jax.random.fold_in(key, 1))
    new.update(params=params, opt_state=opt_state,
               buffers={"quantize": {"ema_vocab_hit_SV": ema}})
    metrics.update(q.usage_metrics(ema, hits, x.shape[0], pn))
    metrics.update(loss=loss, vq_loss=vq, psnr=jnp.mean(psnr(rec, x)), lr=lr,
                   grad_norm=opt_lib.grad_norm(opt_state),
                   restarted=restarted)
    return new, metrics

  rep = sharding.replicated(mesh)
  in_sh = (spec.shardings, {"images": sharding.batch_sharding(mesh)}, rep,
           rep, rep, rep, rep)
  return jax.jit(step, in_shardings=in_sh, out_shardings=(spec.shardings, rep),
                 donate_argnums=(0,))


def step_inputs(lr: float, disc_lr: float, step: int):
  """Host scalars in the dtypes the compiled step expects."""
  return np.float32(lr), np.float32(disc_lr), np.int32(step)
