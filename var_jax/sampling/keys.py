"""Random keys of drawn tokens, folded in, never reused.

A token's key is the run's key folded with its scale, its sample's index in
the whole job and its position in the scale: the draw of an image does not
depend on how the job is split into batches or over devices.
"""

from __future__ import annotations

import jax


def token_keys(key, si, ids_B, pos_l):
  """(B, l) keys: key folded with the scale, the sample index, the position."""
  k_si = jax.random.fold_in(key, si)
  per_b = jax.vmap(lambda i: jax.random.fold_in(k_si, i))(ids_B)
  return jax.vmap(lambda kb: jax.vmap(
      lambda p: jax.random.fold_in(kb, p))(pos_l))(per_b)
