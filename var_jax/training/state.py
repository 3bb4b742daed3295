"""Creating the training state (parameters + optimizer state) in its shards.

The state is a plain pytree, `{'params': nested dict, 'opt_state': ...}`;
the module structure lives in a separate `nnx.GraphDef`, so the jitted step
is a pure function of arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from var_jax.config import VARConfig
from var_jax.models.transformer import VAR
from var_jax.models.vqvae import VQVAE
from var_jax.training import sharding

# AdaLN gamma gain the VAR constructor uses (the official default).
_MODEL_ADALN_GAMMA = 1e-5


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """What the trainer needs to build, restore and step the state."""

  graphdef: nnx.GraphDef
  abstract: dict  # ShapeDtypeStructs of the state, without shardings.
  shardings: dict  # NamedShardings of the state.

  @property
  def target(self) -> dict:
    """Abstract state with shardings (an Orbax restore target)."""
    return sharding.with_shardings(self.abstract, self.shardings)


def scale_adaln_gamma(params: dict, cfg: VARConfig, gamma: float) -> dict:
  """Sets the AdaLN gamma gains' init scale (official `--alng`)."""
  if gamma == _MODEL_ADALN_GAMMA:
    return params
  r, c = gamma / _MODEL_ADALN_GAMMA, cfg.embed_dim
  blocks = dict(params["blocks"])
  if cfg.shared_aln:  # (depth, 6, C): rows 0-1 are gamma1, gamma2.
    blocks["ada_gss"] = blocks["ada_gss"].at[:, :2].multiply(r)
  else:  # (depth, C, 6C): the first 2C output columns.
    blocks["ada_w"] = blocks["ada_w"].at[:, :, :2 * c].multiply(r)
  return {**params, "blocks": blocks}


def var_state_spec(cfg: VARConfig, tx: optax.GradientTransformation,
                   mesh: Mesh) -> StateSpec:
  """Graph, abstract state and shardings of a VAR and its optimizer."""
  abstract_model = nnx.eval_shape(lambda: VAR(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model)
  params_sh = sharding.param_shardings(abstract_params, mesh)
  abstract = jax.eval_shape(lambda: _fresh(cfg, tx, 0, _MODEL_ADALN_GAMMA))
  opt_sh = sharding.opt_state_shardings(tx, abstract["opt_state"], params_sh,
                                        mesh)
  return StateSpec(graphdef, abstract, {"params": params_sh,
                                        "opt_state": opt_sh})


def _fresh(cfg, tx, seed, adaln_gamma):
  model = VAR(cfg, rngs=nnx.Rngs(seed))
  params = scale_adaln_gamma(nnx.to_pure_dict(nnx.state(model)), cfg,
                             adaln_gamma)
  # Strong dtypes throughout (the constructor makes some weakly typed
  # constants): step outputs are strongly typed, and a type change between
  # the first and second call would compile the step twice.
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), params)
  return {"params": params, "opt_state": tx.init(params)}


def init_state(spec: StateSpec, cfg: VARConfig, tx, *, seed: int,
               adaln_gamma: float = _MODEL_ADALN_GAMMA) -> dict:
  """Random initialisation, computed directly into the state's shards."""
  fn = jax.jit(lambda: _fresh(cfg, tx, seed, adaln_gamma),
               out_shardings=spec.shardings)
  return fn()


def state_from_params(spec: StateSpec, tx, params: dict) -> dict:
  """Fresh optimizer state around copies of the given parameters.

  Copies, because the step donates its state: the caller's arrays survive.
  """
  params = jax.device_put(params, spec.shardings["params"], may_alias=False)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), params)
  opt = jax.jit(tx.init, out_shardings=spec.shardings["opt_state"])(params)
  return {"params": params, "opt_state": opt}


def vae_state(vae: VQVAE, mesh: Mesh) -> tuple[nnx.GraphDef, dict, dict]:
  """The frozen tokenizer, replicated: (graphdef, state, shardings)."""
  graphdef, state = nnx.split(vae)
  pure = nnx.to_pure_dict(state)
  sh = jax.tree.map(lambda _: sharding.replicated(mesh), pure)
  return graphdef, jax.device_put(pure, sh), sh
