"""PyTorch-exact bicubic upsampling and area downsampling vs golden interp.npz."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_rel

from var_jax.models.var.config import PATCH_NUMS_256, PATCH_NUMS_512
from var_jax.models.interp import area_resize, bicubic_resize


def _nhwc(a):
  return jnp.asarray(a.transpose(0, 2, 3, 1))


def _nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("res,pns", [("256", PATCH_NUMS_256),
                                     ("512", PATCH_NUMS_512)])
def test_bicubic_up_and_area_down_every_scale(golden, res, pns):
  g = golden("interp")
  full = pns[-1]
  src = _nhwc(g[f"{res}_src_full"])
  for pn in pns:
    up = bicubic_resize(_nhwc(g[f"{res}_small_{pn}"]), full)
    assert_close_rel(_nchw(up), g[f"{res}_bicubic_up_{pn}"],
                     name=f"{res} bicubic {pn}")
    down = area_resize(src, pn)
    assert_close_rel(_nchw(down), g[f"{res}_area_down_{pn}"],
                     name=f"{res} area {pn}")


def test_bicubic_is_not_bilinear():
  # A non-trivial check that the cubic kernel (a=-0.75) overshoots.
  x = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(1.0)
  y = bicubic_resize(x, 8)
  assert float(jnp.min(y)) < 0.0
