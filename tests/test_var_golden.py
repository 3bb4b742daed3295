"""VAR teacher-forced logits, loss and every gradient vs the official outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_rel
from flax import nnx
from golden_models import golden_var

from var_jax.convert.load import export_flat
from var_jax.convert.mapping import var_rules


def official_loss(logits_BLV, targets_BL):
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits_BLV, -1),
                            targets_BL[..., None], -1)[..., 0]
  return jnp.mean(jnp.sum(ce / ce.shape[1], axis=1))


CASES = [("tiny", "var_tiny_io"), ("tiny_saln512", "var_tiny_saln512_io")]


@pytest.mark.parametrize("preset,io", CASES)
def test_logits_loss_and_grads(golden_dir, golden, preset, io):
  g = golden(io)
  var = golden_var(golden_dir, preset)
  k = len(var.cfg.patch_nums)
  labels = jnp.asarray(g["label"])
  x = jnp.asarray(g["var_input"])
  tgt = jnp.concatenate([jnp.asarray(g[f"idx_{i}"]) for i in range(k)], 1)
  logits = var(labels, x)
  assert logits.shape == g["logits_tf"].shape
  assert_close_rel(logits, g["logits_tf"], name="logits_tf")

  loss, grads = nnx.value_and_grad(
      lambda m: official_loss(m(labels, x), tgt))(var)
  assert_close_rel(loss, g["train_loss"], name="train_loss")
  grad_keys = [kk for kk in g if kk.startswith("grad/")]
  if preset == "tiny":
    assert len(grad_keys) == 34
  flat = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
  ours = export_flat(flat, var_rules(var.cfg))
  if grad_keys:  # Every trainable parameter has an official gradient.
    assert set(ours) == {kk[5:] for kk in grad_keys}
  for kk in grad_keys:
    assert_close_rel(ours[kk[5:]], g[kk], name=kk)
