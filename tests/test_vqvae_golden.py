"""VQVAE + residual quantizer parity with the official outputs (vae_tiny_io)."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_rel
from flax import nnx
from golden_models import golden_vae

from var_jax.models.var import quantizer as q

K = 10


@pytest.fixture(scope="module")
def setup(golden_dir, golden):
  g = golden("vae_tiny_io")
  vae = golden_vae(golden_dir)
  x = jnp.asarray(g["img_u8"].transpose(0, 2, 3, 1).astype(np.float32)
                  / 127.5 - 1)
  return g, vae, x, _outputs(vae, x, [jnp.asarray(g[f"idx_{si}"])
                                      for si in range(K)],
                             jnp.asarray(g["fhat_9"].transpose(0, 2, 3, 1)))


@nnx.jit
def _outputs(vae, x, idx_golden, fhat_golden):
  """Everything the parity cases compare, in one compiled program."""
  pn = vae.cfg.v_patch_nums
  f = vae.encode(x)
  fhats = q.f_to_fhats(vae.quantize, f, pn)
  return {"f": f, "idx": q.f_to_idx(vae.quantize, f, pn), "fhats": fhats,
          "var_input": q.idx_to_var_input(vae.quantize, idx_golden, pn),
          "recon_last": vae.decode(fhats[-1]),
          "idx_to_img_last": vae.idx_to_img(idx_golden),
          "fhat_to_img": vae.decode(fhat_golden)}


def _nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def test_encoder_features(setup):
  g, _, _, out = setup
  assert_close_rel(_nchw(out["f"]), g["f"], name="f")


def test_tokens_per_scale_identical(setup):
  g, _, _, out = setup
  idx = out["idx"]
  assert len(idx) == K
  for si in range(K):
    np.testing.assert_array_equal(np.asarray(idx[si]), g[f"idx_{si}"],
                                  err_msg=f"scale {si}")


def test_fhat_per_scale(setup):
  g, _, _, out = setup
  for si, fh in enumerate(out["fhats"]):
    assert_close_rel(_nchw(fh), g[f"fhat_{si}"], name=f"fhat_{si}")


def test_var_input(setup):
  g, _, _, out = setup
  assert_close_rel(out["var_input"], g["var_input"], name="var_input")


def test_reconstructions(setup):
  g, _, _, out = setup
  for name in ("recon_last", "idx_to_img_last", "fhat_to_img"):
    assert_close_rel(_nchw(out[name]), g[name], name=name)


def test_training_path(setup):
  """The forward `train-vae` differentiates (`vae_step.forward`, i.e.
  `VQVAE.__call__`) gives the official training outputs."""
  import jax

  from var_jax.models.var.vqvae import Buffer
  from var_jax.training import vae_step
  g, vae, x, _ = setup
  gd, params, buffers = nnx.split(vae, nnx.Param, Buffer)
  out = jax.jit(vae_step.forward, static_argnums=0)(
      gd, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers), x)
  assert_close_rel(_nchw(out.quant.f_hat), g["train_fhat"], name="train_fhat")
  assert_close_rel(out.quant.vq_loss, g["train_vq_loss"], name="train_vq_loss")
  assert_close_rel(_nchw(out.rec), g["train_rec"], name="train_rec")
  assert out.quant.hits_SV.shape == (K, vae.cfg.vocab_size)
  np.testing.assert_array_equal(np.asarray(out.quant.hits_SV.sum(1)),
                                [2 * pn * pn for pn in vae.cfg.v_patch_nums])


def test_straight_through_gradient(setup):
  # d f_hat_st / d f is the identity: the decoder's gradient reaches the encoder.
  _, vae, _, out = setup
  f = out["f"]
  import jax
  g = jax.jit(jax.grad(lambda f_: q.quantize_train(
      vae.quantize, f_, vae.cfg.v_patch_nums, 0.25).f_hat.sum()))(f)
  np.testing.assert_allclose(np.asarray(g), 1.0)
