"""Block-causal training attention against a plain masked softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.models import attention

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PN_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # The d36 / tiny_saln512 list.


def _reference(q, k, v, bias, scale, dtype):
  s = jnp.einsum("nlc,nsc->nls", q.astype(dtype), k.astype(dtype),
                 preferred_element_type=jnp.float32) * scale + bias
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("nls,nsc->nlc", p.astype(dtype), v.astype(dtype),
                    preferred_element_type=jnp.float32)


def test_segments_cover_rows_and_merge_small_scales():
  segs = attention.segments(PN_256)
  assert segs[0][0] == 0 and segs[-1][1] == 680
  assert all(a[1] == b[0] for a, b in zip(segs, segs[1:]))
  assert segs == ((0, 91, 0), (91, 155, 6), (155, 255, 7), (255, 424, 8),
                  (424, 680, 9))
  assert attention.segments((1, 2)) == ((0, 5, 0),)
  segs = attention.segments(PN_512)
  assert segs[0][0] == 0 and segs[-1][1] == 2240
  assert all(a[1] == b[0] for a, b in zip(segs, segs[1:]))


@pytest.mark.parametrize("pn,dtype,tol", [
    (PN_256, jnp.float32, 1e-5),
    pytest.param(PN_512, jnp.float32, 1e-5, marks=pytest.mark.slow),
    ((1, 2, 3, 4, 6, 9), jnp.float32, 1e-5),
    ((1, 2, 4), jnp.float32, 1e-5), (PN_256, jnp.bfloat16, 2e-2)])
def test_values_and_gradients_match_masked_softmax(pn, dtype, tol):
  l = sum(p * p for p in pn)
  n, c, scale = 6, 16, 0.3
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = [jax.random.normal(kk, (n, l, c)) for kk in ks]
  bias = jnp.asarray(attention.block_causal_bias(pn))

  def ours(q, k, v):
    return attention.block_causal_attention(pn, scale, dtype, q, k, v)

  def ref(q, k, v):
    return _reference(q, k, v, bias, scale, dtype)

  # Values and the gradients of sum(o * do) (the vector-Jacobian product
  # with `do`), each side one compiled program: run op by op, the segment
  # loop of the block-causal form alone took seconds per case.
  @jax.jit
  def values_and_grads(q, k, v):
    o, o_ref = ours(q, k, v), ref(q, k, v)
    g = jax.vjp(ours, q, k, v)[1](do)
    g_ref = jax.vjp(ref, q, k, v)[1](do)
    return o, o_ref, g, g_ref

  o, o_ref, g, g_ref = values_and_grads(q, k, v)
  np.testing.assert_allclose(o, o_ref, atol=tol, rtol=tol)
  for a, b in zip(g, g_ref):
    scale_ref = float(jnp.max(jnp.abs(b)))
    assert float(jnp.max(jnp.abs(a - b))) <= tol * scale_ref, (
        float(jnp.max(jnp.abs(a - b))), scale_ref)


def test_group_size_respects_tile_budget():
  g = attention.group_size(64, 256, 680)
  assert 64 % g == 0 and g * 256 * 680 * 4 <= attention.TILE_BYTES
  assert attention.group_size(64, 4096, 4096) == 1
