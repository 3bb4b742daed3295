"""Training state: its spec (graphs, abstract arrays, shardings) and creation.

A state is a plain pytree of arrays (`{'params': nested dict, 'opt_state':
..., ...}`); the module structure lives in separate `nnx.GraphDef`s, so a
jitted step is a pure function of arrays. Both trainers build their state
with the helpers here: the abstract state comes from `jax.eval_shape`, the
shardings from the parameters' declared axis names, and the real state is
computed directly into its shards (`jit(out_shardings=...)`), so no device
ever holds the whole unsharded model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from var_jax.models.var.config import VARConfig
from var_jax.models.abstract import abstract_split
from var_jax.models.var.transformer import VAR
from var_jax.models.var.vqvae import VQVAE
from var_jax.training import sharding

# AdaLN gamma gain the VAR constructor uses (the official default).
_MODEL_ADALN_GAMMA = 1e-5


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """What a run needs to build, restore and step its state."""

  graphdef: nnx.GraphDef  # The trained model (VAR, or VQVAE as Param/Buffer).
  abstract: dict  # ShapeDtypeStructs of the state, without shardings.
  shardings: dict  # NamedShardings of the state.
  disc_graphdef: nnx.GraphDef | None = None  # Tokenizer runs with a GAN.

  @property
  def target(self) -> dict:
    """Abstract state with shardings (an Orbax restore target)."""
    return sharding.with_shardings(self.abstract, self.shardings)


def strong(tree):
  """Strongly typed copies of a tree's arrays.

  Step outputs are strongly typed; a weak type in the first input would make
  the second call compile the step again.
  """
  return jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), tree)


def state_shardings(abstract: dict, mesh: Mesh, groups: dict) -> dict:
  """Shardings of a state tree.

  Args:
    abstract: the abstract state (top-level dict).
    mesh: the run's mesh.
    groups: {params key: (abstract nnx.State of the module, optimizer,
      optimizer-state key)}; parameters follow their declared axis names,
      optimizer moments their parameters. Other entries are replicated.
  """
  rep = sharding.replicated(mesh)
  out = {k: jax.tree.map(lambda _: rep, v) for k, v in abstract.items()}
  for key, (nnx_abs, tx, opt_key) in groups.items():
    out[key] = sharding.param_shardings(nnx_abs, mesh)
    out[opt_key] = sharding.opt_state_shardings(tx, abstract[opt_key],
                                                out[key], mesh)
  return out


def init_in_shards(spec: StateSpec, fresh: Callable[[], dict]) -> dict:
  """`fresh()` (a random initialisation) computed directly into its shards."""
  return jax.jit(fresh, out_shardings=spec.shardings)()


# ------------------------------------------------------------ VAR
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


def _fresh_var(cfg, tx, seed, adaln_gamma):
  model = VAR(cfg, rngs=nnx.Rngs(seed))
  params = strong(scale_adaln_gamma(nnx.to_pure_dict(nnx.state(model)), cfg,
                                    adaln_gamma))
  return {"params": params, "opt_state": tx.init(params)}


def var_state_spec(cfg: VARConfig, tx: optax.GradientTransformation,
                   mesh: Mesh) -> StateSpec:
  """Graph, abstract state and shardings of a VAR and its optimizer."""
  graphdef, abstract_params = abstract_split(VAR, cfg)
  abstract = jax.eval_shape(lambda: _fresh_var(cfg, tx, 0, _MODEL_ADALN_GAMMA))
  sh = state_shardings(abstract, mesh,
                       {"params": (abstract_params, tx, "opt_state")})
  return StateSpec(graphdef, abstract, sh)


def init_state(spec: StateSpec, cfg: VARConfig, tx, *, seed: int,
               adaln_gamma: float = _MODEL_ADALN_GAMMA) -> dict:
  """A randomly initialised VAR state, in its shards."""
  return init_in_shards(spec, lambda: _fresh_var(cfg, tx, seed, adaln_gamma))


def state_from_params(spec: StateSpec, tx, params: dict) -> dict:
  """Fresh optimizer state around copies of the given parameters.

  Copies, because the step donates its state: the caller's arrays survive.
  """
  params = jax.device_put(params, spec.shardings["params"], may_alias=False)
  params = strong(params)
  opt = jax.jit(tx.init, out_shardings=spec.shardings["opt_state"])(params)
  return {"params": params, "opt_state": opt}


def vae_state(vae: VQVAE, mesh: Mesh) -> tuple[nnx.GraphDef, dict, dict]:
  """The frozen tokenizer, replicated: (graphdef, state, shardings)."""
  graphdef, state = nnx.split(vae)
  pure = nnx.to_pure_dict(state)
  sh = jax.tree.map(lambda _: sharding.replicated(mesh), pure)
  return graphdef, jax.device_put(pure, sh), sh
