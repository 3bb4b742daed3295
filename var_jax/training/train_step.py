"""One jitted, donated VAR training step over explicit shardings.

images -> frozen VQVAE tokens -> teacher-forcing input -> VAR (class dropout
to the null class, drop-path) -> weighted CE -> gradients (optionally
accumulated over micro-batches) -> clip + AdamW. Everything random derives
from (seed, step), so a resumed run repeats an uninterrupted one. The
held-out evaluation (`make_eval_step`) shares the tokenizer path.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from var_jax.models.var.config import ModelConfig
from var_jax.models.var import quantizer as q
from var_jax.models import attention, scales
from var_jax.models.var.vqvae import one_image_at_a_time
from var_jax.training import loss as loss_lib
from var_jax.training import optimizer as opt_lib
from var_jax.training import sharding
from var_jax.training.state import StateSpec

@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Static choices baked into the compiled step."""

  label_smooth: float = 0.0
  dtype: str = "float32"  # Matmul compute dtype; weights stay float32.
  grad_accum: int = 1  # Micro-batches per optimizer step.
  tokens: bool = False  # Batches carry 'tokens' (B, L) instead of 'images'.
  dropout: bool = True  # Class dropout and drop-path (False: eval mode).
  remat: str = "none"  # What the backward pass recomputes (VAR's REMAT).
  # Unrolled layer and micro-batch loops: the same step, but a compiler's
  # cost analysis (which counts a loop body once) sees all of its work.
  unroll: bool = False


def _make_tokenize(model_cfg: ModelConfig, vae_graphdef: nnx.GraphDef,
                   mesh: Mesh, tokens: bool) -> Callable:
  """tokenize(vae_state, batch) -> (teacher-forcing input, targets (B, L))."""
  patch_nums = model_cfg.var.patch_nums
  layout = scales.layout(tuple(patch_nums))
  # See vqvae.one_image_at_a_time (sharded batches are encoded whole).
  encode_one_by_one = (mesh.devices.size == 1 and
                       mesh.devices.flat[0].platform == "cpu")

  def tokenize(vae_state, batch):
    vae = nnx.merge(vae_graphdef, vae_state)
    if tokens:
      idx = layout.split(batch["tokens"])
    else:
      images = batch["images"]
      if encode_one_by_one:
        f = one_image_at_a_time(vae.encode, images)
      else:
        f = vae.encode(images)
      idx = q.f_to_idx(vae.quantize, f, patch_nums)
    x_BLC = q.idx_to_var_input(vae.quantize, idx, patch_nums)
    tgt_BL = layout.join(idx)
    return jax.lax.stop_gradient(x_BLC), tgt_BL

  return tokenize


def make_train_step(model_cfg: ModelConfig, var_spec: StateSpec,
                    vae_graphdef: nnx.GraphDef, vae_shardings: dict,
                    tx: optax.GradientTransformation, mesh: Mesh,
                    opts: StepOptions = StepOptions()) -> Callable:
  """Returns step(state, vae_state, batch, lr, wd, weights_L, step, key).

  `state` is donated. `batch` holds 'labels' and 'images' (or 'tokens') as
  global arrays sharded over the batch; `lr`, `wd` (float32 scalars),
  `weights_L` (the (L,) token weights) and `step` (int32) are replicated, and
  `key` is the run's base PRNG key. Returns (new state, metrics).
  """
  patch_nums = model_cfg.var.patch_nums
  dtype = jnp.dtype(opts.dtype)
  n_micro = opts.grad_accum
  batch_sh = sharding.batch_sharding(mesh)
  tokenize = _make_tokenize(model_cfg, vae_graphdef, mesh, opts.tokens)

  def micro_step(params, vae_state, batch, weights_L, key):
    x_BLC, tgt_BL = tokenize(vae_state, batch)

    def loss_fn(p):
      var = nnx.merge(var_spec.graphdef, p)
      logits_BLV = var(batch["labels"], x_BLC,
                       dropout_key=key if opts.dropout else None, dtype=dtype,
                       remat=opts.remat, unroll=opts.unroll)
      loss = loss_lib.weighted_loss(logits_BLV, tgt_BL, weights_L,
                                    opts.label_smooth)
      return loss, loss_lib.scale_metrics(logits_BLV, tgt_BL, patch_nums)

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, sums, grads

  def accumulate(params, vae_state, batch, weights_L, key):
    # Micro-batch i takes rows i, i + n, i + 2n, ...: each device keeps its
    # own rows, so splitting needs no communication.
    def split(a):
      a = a.reshape((a.shape[0] // n_micro, n_micro) + a.shape[1:])
      a = jnp.swapaxes(a, 0, 1)
      return jax.lax.with_sharding_constraint(
          a, jax.sharding.NamedSharding(
              mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES)))

    micro = jax.tree.map(split, batch)
    # The gradient sum is sharded as the parameters are: left to itself,
    # the compiler may keep the loop's carry whole on every device.
    param_sh = var_spec.shardings["params"]

    def body(carry, xs):
      i, mb = xs
      loss, sums, grads = micro_step(params, vae_state, mb, weights_L,
                                     jax.random.fold_in(key, i))
      grads = jax.lax.with_sharding_constraint(grads, param_sh)
      return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None

    zeros = jax.tree.map(
        jnp.zeros_like, jax.eval_shape(micro_step, params, vae_state,
                                       jax.tree.map(lambda a: a[0], micro),
                                       weights_L, key))
    zeros = (zeros[0], zeros[1],
             jax.lax.with_sharding_constraint(zeros[2], param_sh))
    (loss, sums, grads), _ = jax.lax.scan(
        body, zeros, (jnp.arange(n_micro), micro), unroll=opts.unroll)
    # The reference scales each micro-loss by 1/n before summing gradients.
    return loss / n_micro, sums, jax.tree.map(lambda g: g / n_micro, grads)

  def step(state, vae_state, batch, lr, wd, weights_L, step_i, base_key):
    key = jax.random.fold_in(base_key, step_i)
    params = state["params"]
    run = micro_step if n_micro == 1 else accumulate
    with attention.on_mesh(mesh):  # The mesh's platform picks the kernel.
      loss, sums, grads = run(params, vae_state, batch, weights_L, key)
    opt_state = opt_lib.set_lr_wd(state["opt_state"], lr, wd)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = loss_lib.finalize_metrics(sums)
    metrics.update(loss=loss, grad_norm=opt_lib.grad_norm(opt_state), lr=lr,
                   wd=wd)
    return {"params": params, "opt_state": opt_state}, metrics

  rep = sharding.replicated(mesh)
  data_key = "tokens" if opts.tokens else "images"
  in_sh = (var_spec.shardings, vae_shardings,
           {data_key: batch_sh, "labels": batch_sh}, rep, rep, rep, rep, rep)
  return jax.jit(step, in_shardings=in_sh, out_shardings=(
      var_spec.shardings, rep), donate_argnums=(0,))


def step_inputs(lr: float, wd: float, weights_L: np.ndarray, step: int):
  """Host scalars in the dtypes the compiled step expects."""
  return (np.float32(lr), np.float32(wd), np.asarray(weights_L, np.float32),
          np.int32(step))


def make_eval_step(model_cfg: ModelConfig, var_spec: StateSpec,
                   vae_graphdef: nnx.GraphDef, vae_shardings: dict,
                   mesh: Mesh, opts: StepOptions = StepOptions()) -> Callable:
  """Returns sums(params, vae_state, batch): held-out metric sums.

  The official evaluation: the model in eval mode (no class dropout, no
  drop-path), teacher-forced on the ground-truth tokens, unsmoothed cross
  entropy and top-1 accuracy per scale and over all tokens, as the batch
  sums of `loss.scale_metrics` (replicated; add them over batches and pass
  the total to `loss.finalize_metrics`).
  """
  patch_nums = model_cfg.var.patch_nums
  dtype = jnp.dtype(opts.dtype)
  tokenize = _make_tokenize(model_cfg, vae_graphdef, mesh, opts.tokens)

  def sums(params, vae_state, batch):
    x_BLC, tgt_BL = tokenize(vae_state, batch)
    var = nnx.merge(var_spec.graphdef, params)
    with attention.on_mesh(mesh):
      logits_BLV = var(batch["labels"], x_BLC, dropout_key=None, dtype=dtype)
    return loss_lib.scale_metrics(logits_BLV, tgt_BL, patch_nums)

  batch_sh = sharding.batch_sharding(mesh)
  data_key = "tokens" if opts.tokens else "images"
  return jax.jit(sums, in_shardings=(
      var_spec.shardings["params"], vae_shardings,
      {data_key: batch_sh, "labels": batch_sh}),
      out_shardings=sharding.replicated(mesh))
