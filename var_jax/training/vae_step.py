"""The tokenizer's training state and its jitted, donated training step.

images -> encoder -> multi-scale residual quantizer (straight-through) ->
decoder -> L1/L2 (+ LPIPS) reconstruction + VQ loss (+ the PatchGAN hinge
term with VQGAN's adaptive weight) -> clip + AdamW; then the usage EMA
(`ema_vocab_hit_SV`, the official update rule) and, every
`restart_every` steps, the restart of dead codes. The discriminator takes its
own hinge-loss step on the same batch. Everything random derives from
(seed, step), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from var_jax.models import discriminator as disc_lib
from var_jax.models import quantizer as q
from var_jax.models.interp import area_resize
from var_jax.models.lpips import lpips_distance
from var_jax.models.vqvae import VQVAE, Buffer
from var_jax.training import optimizer as opt_lib
from var_jax.training import sharding
from var_jax.training.vae_config import VAETrainConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The official usage margin: a code counts as used with >= 8% of a uniform
# share of the tokens.
USAGE_MARGIN = 0.08


@dataclasses.dataclass(frozen=True)
class VAEStateSpec:
  """Graphs, abstract state and shardings of a tokenizer run."""

  graphdef: nnx.GraphDef  # VQVAE split as (Param, Buffer).
  disc_graphdef: nnx.GraphDef | None
  abstract: dict
  shardings: dict

  @property
  def target(self) -> dict:
    return sharding.with_shardings(self.abstract, self.shardings)


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


def _strong(tree):
  # Strongly typed arrays: the step's outputs are, and a type change between
  # the first and second call would compile it twice.
  return jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), tree)


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
  params = _strong(nnx.to_pure_dict(p))
  state = {"params": params, "buffers": _strong(nnx.to_pure_dict(b)),
           "opt_state": tx.init(params)}
  if disc is not None:
    dp = _strong(nnx.to_pure_dict(nnx.state(disc)))
    state.update(disc=dp, disc_opt_state=dtx.init(dp))
  return state


def build(cfg: VAETrainConfig, mesh: Mesh):
  """(spec, generator optimizer, discriminator optimizer or None)."""
  vae, disc = nnx.eval_shape(lambda: _modules(cfg, 0))
  graphdef, p_abs, _ = nnx.split(vae, nnx.Param, Buffer)
  tx = make_optimizer(nnx.to_pure_dict(p_abs), b1=cfg.b1, b2=cfg.b2,
                      clip=cfg.clip)
  dtx, dgd = None, None
  if disc is not None:
    dgd, d_abs = nnx.split(disc)
    dtx = make_optimizer(nnx.to_pure_dict(d_abs), b1=cfg.b1, b2=cfg.b2,
                         clip=cfg.clip)
  abstract = jax.eval_shape(lambda: _fresh(cfg, tx, dtx, 0))
  rep = sharding.replicated(mesh)
  p_sh = sharding.param_shardings(p_abs, mesh)
  sh = {"params": p_sh,
        "buffers": jax.tree.map(lambda _: rep, abstract["buffers"]),
        "opt_state": sharding.opt_state_shardings(
            tx, abstract["opt_state"], p_sh, mesh)}
  if disc is not None:
    d_sh = sharding.param_shardings(d_abs, mesh)
    sh.update(disc=d_sh, disc_opt_state=sharding.opt_state_shardings(
        dtx, abstract["disc_opt_state"], d_sh, mesh))
  return VAEStateSpec(graphdef, dgd, abstract, sh), tx, dtx


def init_state(spec: VAEStateSpec, cfg: VAETrainConfig, tx, dtx, *,
               seed: int) -> dict:
  """Random initialisation, computed directly into the state's shards."""
  return jax.jit(lambda: _fresh(cfg, tx, dtx, seed),
                 out_shardings=spec.shardings)()


def vae_tree(state: dict) -> dict:
  """The full VQVAE state (params + buffers) in the model-directory layout."""
  def merge(a, b):
    out = dict(a)
    for k, v in b.items():
      out[k] = merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out
  return merge(state["params"], state["buffers"])


# ------------------------------------------------------------ model pieces
def decoder_trunk(dec, z_BhwC):
  """The decoder up to (not including) `conv_out`: the last layer's input."""
  h = dec.mid(dec.conv_in(z_BhwC))
  for level in reversed(list(dec.up)):
    h = level.run_blocks(h)
    if level.resample is not None:
      h = level.resample(h)
  return nnx.silu(dec.norm_out(h))


def conv_out_nobias(h_BHWC, kernel_HWIO):
  """`conv_out` without its bias: linear in the kernel (adaptive weight)."""
  return jax.lax.conv_general_dilated(
      h_BHWC, kernel_HWIO, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def update_ema(ema_SV, hits_SV, step_i):
  """The official `ema_vocab_hit_SV` rule, with its per-(call, scale) counter.

  The reference counts one record per scale per training forward: record
  t * S + si copies the hits when 0, else decays by 0.9 below 100, else 0.99.
  """
  s = ema_SV.shape[0]
  rec = step_i * s + jnp.arange(s)
  decay = jnp.where(rec == 0, 0.0, jnp.where(rec < 100, 0.9, 0.99))[:, None]
  return ema_SV * decay + hits_SV * (1.0 - decay)


def uniform_share(batch: int, patch_nums, vocab: int) -> jax.Array:
  """Hits per code per step if all codes were used equally, per scale (S,)."""
  return jnp.asarray([batch * pn * pn / vocab for pn in patch_nums],
                     jnp.float32)


def residual_vectors(quant, f_BHWC, patch_nums) -> jax.Array:
  """The vectors each scale quantizes (area-pooled residuals), as (N, C)."""
  c = f_BHWC.shape[-1]
  fhats = q.f_to_fhats(quant, f_BHWC, patch_nums)
  out, prev = [], 0.0
  for si, pn in enumerate(patch_nums):
    r = area_resize(f_BHWC - prev, pn)
    out.append(r.reshape(-1, c))
    prev = fhats[si]
  return jnp.concatenate(out)


def restart_dead_codes(quant, f_BHWC, ema_SV, key, patch_nums,
                       threshold: float):
  """Re-initialises codes whose usage EMA fell below a share of uniform use.

  Dead codes restart at random latent vectors of the batch (the residuals
  the scales quantize, with tiny noise so no two coincide). Their usage
  restarts from zero: the next check judges only what they did since.

  Returns (codebook (V, C), ema (S, V), number restarted).
  """
  codebook_VC = quant.codebook_VC
  v = codebook_VC.shape[0]
  share_S = uniform_share(f_BHWC.shape[0], patch_nums, v)
  dead_V = jnp.sum(ema_SV, axis=0) < threshold * jnp.sum(share_S)
  z_NC = residual_vectors(quant, f_BHWC.astype(jnp.float32), patch_nums)
  n = z_NC.shape[0]
  k_pick, k_noise = jax.random.split(key)
  pick = jax.random.choice(k_pick, n, (v,), replace=n < v)
  scale = jnp.sqrt(jnp.mean(z_NC * z_NC)) * 1e-3
  new_VC = z_NC[pick] + scale * jax.random.normal(k_noise, codebook_VC.shape)
  codebook_VC = jnp.where(dead_V[:, None], new_VC.astype(codebook_VC.dtype),
                          codebook_VC)
  ema_SV = jnp.where(dead_V[None, :], 0.0, ema_SV)
  return codebook_VC, ema_SV, jnp.sum(dead_V).astype(jnp.int32)


def usage_metrics(ema_SV, hits_SV, batch: int, patch_nums) -> dict:
  """Codebook usage (% of codes above the official margin) and perplexity."""
  v = ema_SV.shape[1]
  share_S = uniform_share(batch, patch_nums, v)
  used_S = jnp.mean(ema_SV >= USAGE_MARGIN * share_S[:, None], axis=1) * 100
  used = jnp.mean(jnp.sum(ema_SV, 0) >= USAGE_MARGIN * jnp.sum(share_S)) * 100
  p_SV = hits_SV / jnp.sum(hits_SV, axis=1, keepdims=True)
  ent_S = -jnp.sum(jnp.where(p_SV > 0, p_SV * jnp.log(p_SV), 0.0), axis=1)
  return {"usage": used, "scale_usage": used_S, "scale_ppl": jnp.exp(ent_S)}


def psnr(rec_BHWC, x_BHWC) -> jax.Array:
  """Mean per-image PSNR (dB) of images in [-1, 1], measured in [0, 1]."""
  d = (jnp.clip(rec_BHWC, -1, 1) - x_BHWC) / 2
  mse_B = jnp.maximum(jnp.mean(d * d, axis=(1, 2, 3)), 1e-10)
  return jnp.mean(-10.0 * jnp.log10(mse_B))


# ------------------------------------------------------------ the step
def _cast(params: dict, dtype) -> dict:
  """Compute copies of the conv weights; the quantizer stays float32."""
  if dtype == jnp.float32:
    return params
  return {k: v if k == "quantize" else jax.tree.map(
      lambda x: x.astype(dtype), v) for k, v in params.items()}


def make_vae_step(spec: VAEStateSpec, cfg: VAETrainConfig, tx, dtx,
                  mesh: Mesh, *, gan: bool) -> Callable:
  """Returns step(state, batch, lpips_w, lr, disc_lr, step, key).

  `state` is donated; `batch` holds 'images' sharded over the batch;
  `lpips_w` is the LPIPS weight tree (or {}); `lr`, `disc_lr` are float32
  scalars, `step` int32, `key` the run's base key. `gan` (static) switches
  the adversarial terms on: before `disc_start` the discriminator is left
  untouched. Returns (new state, metrics).
  """
  vae_cfg = cfg.vae_config()
  pn, beta = vae_cfg.v_patch_nums, vae_cfg.beta
  dtype = DTYPES[cfg.dtype]
  f32 = jnp.float32
  if gan and not cfg.gan:
    raise ValueError("gan=True needs a config with disc_weight > 0")

  def forward(params, buffers, x):
    vae = nnx.merge(spec.graphdef, _cast(params, dtype), buffers)
    f = vae.encode(x.astype(dtype))
    out = q.quantize_train(vae.quantize, f, pn, beta)
    h = decoder_trunk(vae.decoder, vae.post_quant_conv(out.f_hat.astype(dtype)))
    rec = vae.decoder.conv_out(h).astype(f32)
    aux = (jax.lax.stop_gradient(f).astype(f32), out.hits_SV,
           jax.lax.stop_gradient(h).astype(f32))
    return (rec, out.vq_loss.astype(f32)), aux

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
    cb, ema, n = restart_dead_codes(quant, f, ema, key, pn,
                                    cfg.restart_threshold)
    emb = {**params["quantize"]["embedding"], "embedding": cb}
    params = {**params, "quantize": {**params["quantize"], "embedding": emb}}
    return params, ema, n

  def step(state, batch, lpips_w, lr, disc_lr, step_i, base_key):
    key = jax.random.fold_in(base_key, step_i)
    x = batch["images"].astype(f32)
    params, buffers = state["params"], state["buffers"]
    (rec, vq), vjp_fn, (f, hits, h) = jax.vjp(
        lambda p: forward(p, buffers, x), params, has_aux=True)
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
    ema = update_ema(buffers["quantize"]["ema_vocab_hit_SV"], hits, step_i)
    restarted = jnp.zeros((), jnp.int32)
    if cfg.restart_every:
      params, ema, restarted = jax.lax.cond(
          (step_i + 1) % cfg.restart_every == 0, restart,
          lambda p, e, *_: (p, e, jnp.zeros((), jnp.int32)),
          params, ema, f, jax.random.fold_in(key, 1))
    new.update(params=params, opt_state=opt_state,
               buffers={"quantize": {"ema_vocab_hit_SV": ema}})
    metrics.update(usage_metrics(ema, hits, x.shape[0], pn))
    metrics.update(loss=loss, vq_loss=vq, psnr=psnr(rec, x), lr=lr,
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
