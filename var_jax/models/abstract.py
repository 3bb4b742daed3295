"""Abstract models: a module's graph and parameter shapes, nothing allocated.

Loading a checkpoint, converting weights and counting parameters all start
from the shapes of a freshly built module. `nnx.eval_shape` traces every
initializer to get them. Two things keep that cheap: the random keys are
drawn eagerly (a traced key counter makes every draw cost time proportional
to the trace so far, since flax asks the new count for its sharding and the
tracer's error message searches the trace), and one trace per constructor
and arguments is kept and copied.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx


class _EagerStream(nnx.RngStream):
  """An RNG stream whose keys and counter stay concrete inside a trace."""

  def __call__(self) -> jax.Array:
    with jax.ensure_compile_time_eval():
      return super().__call__()


def _eager_rngs() -> nnx.Rngs:
  with jax.ensure_compile_time_eval():
    rngs = nnx.Rngs(0)
    rngs.default = _EagerStream(rngs.default.key.get_value(), tag="default")
  return rngs


@functools.lru_cache(maxsize=64)
def _split(ctor, args: tuple, kwargs: tuple):
  return nnx.split(nnx.eval_shape(
      lambda: ctor(*args, rngs=_eager_rngs(), **dict(kwargs))))


def abstract_split(ctor, *args, **kwargs) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state of `jax.ShapeDtypeStruct`s) of `ctor(*args, rngs=...,
  **kwargs)`; the arguments must be hashable (configs are frozen).

  The state is the caller's own copy: filling it in changes no other call's.
  """
  graphdef, state = _split(ctor, args, tuple(sorted(kwargs.items())))
  return graphdef, jax.tree.map(lambda x: x, state)


def abstract_model(ctor, *args, **kwargs):
  """The module `ctor(*args, rngs=..., **kwargs)` with abstract values."""
  return nnx.merge(*abstract_split(ctor, *args, **kwargs))
