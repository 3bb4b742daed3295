"""Pieces the transformers of every family build from: parameters that name
their sharding, and the normalisations (computed in float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(value, sharding) -> nnx.Param:
  """A parameter with mesh-axis names. The names are metadata: the trainer
  places the state through jit(out_shardings=...), so nothing is sharded
  eagerly at construction (and Flax's global flax_always_shard_variable is
  left as it is)."""
  return nnx.Param(value, out_sharding=sharding, eager_sharding=False)


def layer_norm(x, eps, weight=None, bias=None):
  """LayerNorm over the last axis in float32; affine only when given."""
  x = x.astype(jnp.float32)
  mu = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
  y = (x - mu) * jax.lax.rsqrt(var + eps)
  return y if weight is None else y * weight + bias


def rms_norm(x, weight, eps):
  """Scale by the root mean square (float32), no mean subtracted."""
  x = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(var + eps) * weight


def l2_normalize(x, eps=1e-12):
  """x / max(|x|, eps) over the last axis (PyTorch's F.normalize)."""
  n = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(n, eps)
