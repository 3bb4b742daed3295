"""The official optimizer: clip to a global norm, then PyTorch-exact AdamW.

The chain is `clip -> inject_hyperparams(adamw)`; the trainer sets the
learning rate and weight decay of every step from `schedule.lr_wd` with
`set_lr_wd`. Which parameters skip weight decay is decided on our own
parameter names (`decays`), written to give the official trainer's set
(`train.py`: 1-D tensors, biases and its `nowd_keys`);
`tests/test_optim_golden.py` checks it against the reference's list.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from var_jax.models.var.config import VARConfig
from var_jax.models.var.transformer import VAR

# Our parameter names without weight decay: biases (1-D in the reference,
# also when we stack them per layer), the attention scale, AdaLN gains, and
# the start / position / level embeddings.
_NOWD_LEAVES = frozenset({"bias", "q_bias", "v_bias", "proj_b", "fc1_b",
                          "fc2_b", "ada_b", "scale_mul", "ada_gss",
                          "pos_start", "pos_1LC"})
_NOWD_MODULES = frozenset({"lvl_embed"})


def decays(path: tuple) -> bool:
  """Whether the parameter at `path` (our tree, e.g. ('blocks', 'fc1_w'))
  takes weight decay."""
  names = [str(k) for k in path]
  return not (names[-1] in _NOWD_LEAVES or _NOWD_MODULES & set(names))


def decay_mask(cfg: VARConfig) -> dict:
  """Nested dict (our parameter tree) of bools: True where wd applies."""
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: VAR(cfg, rngs=nnx.Rngs(0)))))
  return jax.tree_util.tree_map_with_path(
      lambda p, _: decays(tuple(k.key for k in p)), abstract)


class ClipState(NamedTuple):
  grad_norm: jax.Array  # Global norm of the last gradient, before clipping.


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """`torch.nn.utils.clip_grad_norm_`: scale by max_norm / (norm + 1e-6) <= 1.

  Records the pre-clip norm in the state; max_norm <= 0 only records it.
  """

  def init(params):
    del params
    return ClipState(jnp.zeros((), jnp.float32))

  def update(updates, state, params=None):
    del state, params
    norm = optax.global_norm(updates)
    if max_norm > 0:
      coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
      updates = jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates)
    return updates, ClipState(norm.astype(jnp.float32))

  return optax.GradientTransformation(init, update)


class AdamWState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def torch_adamw(learning_rate, weight_decay, b1: float = 0.9, b2: float = 0.95,
                eps: float = 1e-8, decay_mask=None
                ) -> optax.GradientTransformation:
  """`torch.optim.AdamW` (fused or not: same math), as an update.

  p <- p * (1 - lr * wd)  (decoupled, only where `decay_mask` is True)
  p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
  """

  def init(params):
    zeros = lambda p: jnp.zeros_like(p, jnp.float32)  # noqa: E731
    return AdamWState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params),
                      jax.tree.map(zeros, params))

  def update(grads, state, params):
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
    t = count.astype(jnp.float32)
    bc1 = 1 - b1 ** t
    bc2_sqrt = jnp.sqrt(1 - b2 ** t)
    step_size = learning_rate / bc1
    mask = decay_mask if decay_mask is not None else jax.tree.map(
        lambda _: True, params)

    def delta(p, m, v, decays):
      adam = step_size * m / (jnp.sqrt(v) / bc2_sqrt + eps)
      decay = learning_rate * weight_decay * p if decays else 0.0
      return (-decay - adam).astype(p.dtype)

    updates = jax.tree.map(delta, params, mu, nu, mask)
    return updates, AdamWState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def make_optimizer(cfg: VARConfig, *, clip: float = 2.0, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8
                   ) -> optax.GradientTransformation:
  """clip(global norm) -> AdamW with injectable `learning_rate`/`weight_decay`."""
  adamw = functools.partial(torch_adamw, b1=b1, b2=b2, eps=eps,
                            decay_mask=decay_mask(cfg))
  return optax.chain(
      clip_by_global_norm_torch(clip),
      # Strongly typed float32 hyperparameters: the state's types then never
      # change between steps, so the step compiles once.
      optax.inject_hyperparams(adamw, hyperparam_dtype=jnp.float32)(
          learning_rate=0.0, weight_decay=0.0))


def set_lr_wd(opt_state, lr, wd):
  """The optimizer state with this step's learning rate and weight decay."""
  return optax.tree_utils.tree_set(opt_state, learning_rate=lr,
                                   weight_decay=wd)


def grad_norm(opt_state) -> jax.Array:
  """Pre-clip global gradient norm of the last update."""
  return optax.tree_utils.tree_get(opt_state, "grad_norm")
