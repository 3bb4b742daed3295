"""Placing parameters, optimizer state and batches on the mesh.

Parameters follow the mesh-axis names they declare (`out_sharding`); a
dimension that the named axes do not divide falls back to replicated, so any
mesh works for any model. Optimizer moments mirror their parameters. State
is created directly in its shards (`jit(out_shardings=...)` over an
`eval_shape` skeleton), so no device ever holds the whole unsharded model.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def _fit_spec(spec: P, shape: tuple, mesh: Mesh) -> P:
  """Drops axis names that are not in the mesh or do not divide the dim."""
  dims = list(spec) + [None] * (len(shape) - len(spec))
  out = []
  for dim, names in zip(shape, dims):
    group = names if isinstance(names, tuple) else (names,)
    group = tuple(n for n in group if n is not None and n in mesh.shape)
    size = int(np.prod([mesh.shape[n] for n in group])) if group else 1
    if not group or size == 1 or dim % size:
      out.append(None)
    else:
      out.append(group if len(group) > 1 else group[0])
  return P(*out)


def param_shardings(abstract_state: nnx.State, mesh: Mesh) -> dict:
  """Nested dict (pure-dict layout) of NamedShardings for a module's state."""
  specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
  shapes = nnx.to_pure_dict(abstract_state)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)),
      specs, shapes, is_leaf=lambda x: isinstance(x, P))


def unsplit_weights(abstract_state: nnx.State, mesh: Mesh) -> tuple[int, int]:
  """(bytes, count) of the parameters that declare a mesh axis of more than
  one device but stay whole on every device, because the axis does not
  divide their dimension (e.g. width 1,920 over fsdp=256)."""
  specs = jax.tree.leaves(nnx.to_pure_dict(nnx.get_partition_spec(
      abstract_state)), is_leaf=lambda x: isinstance(x, P))
  shapes = jax.tree.leaves(nnx.to_pure_dict(abstract_state))
  total = count = 0
  for spec, x in zip(specs, shapes):
    for names, fitted in zip(spec, _fit_spec(spec, x.shape, mesh)):
      group = names if isinstance(names, tuple) else (names,)
      if fitted is None and any(mesh.shape.get(n, 1) > 1 for n in group
                                if n is not None):
        total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        count += 1
        break
  return total, count


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state,
                        params_sh: dict, mesh: Mesh):
  """Moments take their parameter's sharding; counters and scalars replicate."""
  rep = replicated(mesh)
  return optax.tree_map_params(
      tx, lambda _, sh: sh, abstract_opt_state, params_sh,
      transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, NamedSharding))


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying shardings (restore and lowering targets)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_tree, shardings)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict:
  """This process's slice of a global batch -> global sharded arrays."""
  sh = batch_sharding(mesh)
  out = {}
  for k, local in batch.items():
    local = np.asarray(local)
    glob = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sh, local, glob)
  return out


def to_host(tree):
  """Fully gathered numpy copies (works for arrays spanning processes)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)
