"""The training attention by backend: the choice, the padded splash mask, and
the TPU splash kernel (Pallas interpret mode, on the CPU) against XLA's
attention, forward and gradients."""

import os
import subprocess
import sys
import textwrap
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.models import attention

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PN_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
# 424 tokens -> 512: four 128-blocks, some skipped, some cut by the mask.
PN_SHORT = (1, 2, 3, 4, 5, 6, 8, 10, 13)


def _values_and_grads(pn, impl, n=2, c=64, scale=0.3, dtype=jnp.float32,
                      grads=True, **kw):
  """o and the vector-Jacobian product with a random `do`, one program."""
  l = sum(p * p for p in pn)
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = [jax.random.normal(kk, (n, l, c)) for kk in ks]

  def f(q, k, v):
    return attention.training_attention(pn, scale, dtype, q, k, v, impl=impl,
                                        **kw)

  @jax.jit
  def run(q, k, v):
    if not grads:
      return (f(q, k, v),)
    return (f(q, k, v),) + tuple(jax.vjp(f, q, k, v)[1](do))

  return run(q, k, v)


def _relative_errors(got, want):
  """max |a - b| / max |b| for o, dq, dk, dv."""
  return [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
          for a, b in zip(got, want)]


def test_padded_lengths_and_mask():
  assert attention.padded_length(680) == 768
  assert attention.padded_length(2240) == 2304
  for pn in (PN_256, PN_512, (1, 2)):
    l = sum(p * p for p in pn)
    m = attention.splash_mask(pn)
    p = attention.padded_length(l)
    assert m.shape == (p, p) and m.dtype == np.bool_
    # Real rows: exactly the block-causal mask, never a padded key.
    np.testing.assert_array_equal(m[:l, :l],
                                  attention.block_causal_bias(pn) == 0)
    assert not m[:l, l:].any()
    # Padded rows see something (everything): no row is fully masked.
    assert m[l:].all() and m.any(axis=1).all()


def test_impl_by_platform_and_override():
  assert attention.impl_for("tpu") == "splash"
  assert attention.impl_for("gpu") == "xla"
  assert attention.impl_for("cuda") == "xla"
  assert attention.impl_for("cpu") == "cpu"
  assert attention.impl_for() == "cpu"  # This machine.
  # Without a declared mesh a TPU keeps the segment form (splash cannot be
  # partitioned by XLA); under `on_mesh` the mesh's platform decides.
  with mock.patch.object(jax, "default_backend", return_value="tpu"):
    assert attention.impl_for() == "cpu"
  with mock.patch.object(jax, "default_backend", return_value="gpu"):
    assert attention.impl_for() == "xla"
  mesh = jax.make_mesh((1,), ("data",))
  with attention.on_mesh(mesh):
    assert attention.impl_for() == "cpu"
  with pytest.raises(ValueError, match="unknown attention impl"):
    _values_and_grads((1, 2), "flash")


def test_cpu_path_is_the_tiled_form_bit_for_bit():
  pn, n, c = (1, 2, 3, 4), 3, 8
  l = sum(p * p for p in pn)
  q, k, v = jax.random.normal(jax.random.key(1), (3, n, l, c))
  got = attention.training_attention(pn, 0.3, jnp.float32, q, k, v)
  want = attention.block_causal_attention(pn, 0.3, jnp.float32, q, k, v)
  np.testing.assert_array_equal(got, want)


def test_xla_path_matches_tiled_form():
  pn = (1, 2, 3, 4, 5, 6, 8)  # Two segments, one masked.
  got = _values_and_grads(pn, "xla", n=3, c=16)
  want = _values_and_grads(pn, "cpu", n=3, c=16)
  assert max(_relative_errors(got, want)) <= 1e-5


def _splash_vs_xla(pn, grads=True):
  got = _values_and_grads(pn, "splash", grads=grads, interpret=True)
  want = _values_and_grads(pn, "xla", grads=grads)
  errs = _relative_errors(got, want)
  assert max(errs) <= 1e-5, dict(zip(("o", "dq", "dk", "dv"), errs))
  return errs


def test_splash_interpret_forward_short_scales():
  # The default suite's case: forward only (each kernel compiled for the
  # interpreter costs about a second; the gradient adds two).
  _splash_vs_xla(PN_SHORT, grads=False)


@pytest.mark.slow
def test_splash_interpret_matches_xla_256px():
  # The real 256px list: 680 tokens padded to 768, 2 heads of 64; forward
  # and the gradients of q, k and v.
  errs = _splash_vs_xla(PN_256)
  print("max |splash - xla| / max |xla| (o, dq, dk, dv):", errs)


@pytest.mark.slow
def test_splash_sharded_over_a_mesh():
  # Under `on_mesh`, splash runs per device through shard_map; two forced
  # CPU devices, the kernel interpreted, the rows split over both.
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from var_jax.models import attention
      pn = (1, 2, 3, 4, 5, 6, 8)
      l = sum(p * p for p in pn)
      mesh = jax.make_mesh((2,), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))
      q, k, v = jax.random.normal(jax.random.key(0), (3, 4, l, 64))
      rows = NamedSharding(mesh, P("data"))

      def f(q, k, v, impl):
        with attention.on_mesh(mesh):
          return attention.training_attention(pn, 0.3, jnp.float32, q, k, v,
                                              impl=impl, interpret=True)

      run = jax.jit(f, static_argnums=3, in_shardings=(rows,) * 3,
                    out_shardings=rows)
      got, want = run(q, k, v, "splash"), run(q, k, v, "xla")
      assert got.sharding.is_equivalent_to(rows, 3)
      err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
      assert err <= 1e-5, err
      print("ok", err)
      """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
