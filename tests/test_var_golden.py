"""VAR teacher-forced logits, loss and gradients vs the official outputs.

The 256px golden file holds the official gradient of every parameter; the
512px shared-AdaLN file holds none (see tests/golden/README.md), so there
every gradient is checked against central finite differences of the loss
instead: that covers the shared AdaLN and the hand-written attention
backward on the 512px scale list, which the 256px case does not reach.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_rel
from flax import nnx
from golden_models import golden_var

from var_jax.convert.rules import export_flat
from var_jax.convert.var.official_names import var_rules


def official_loss(logits_BLV, targets_BL):
  """Official VARTrainer loss: per-token CE weighted 1/L, summed, batch mean."""
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits_BLV, -1),
                            targets_BL[..., None], -1)[..., 0]
  return jnp.mean(jnp.sum(ce / ce.shape[1], axis=1))


CASES = [("tiny", "var_tiny_io"), ("tiny_saln512", "var_tiny_saln512_io")]


@functools.lru_cache(maxsize=None)
def _problem(golden_dir, preset, io):
  """(model, jitted (loss, logits) of pure params, pure params, golden
  arrays): one compiled forward serves the logits, the loss and every
  finite difference."""
  g = dict(np.load(golden_dir / f"{io}.npz"))
  var = golden_var(golden_dir, preset)
  k = len(var.cfg.patch_nums)
  labels = jnp.asarray(g["label"])
  x = jnp.asarray(g["var_input"])
  tgt = jnp.concatenate([jnp.asarray(g[f"idx_{i}"]) for i in range(k)], 1)
  graph, state = nnx.split(var)

  def loss_and_logits(pure):
    st = nnx.clone(state)
    nnx.replace_by_pure_dict(st, pure)
    logits = nnx.merge(graph, st)(labels, x)
    return official_loss(logits, tgt), logits

  return var, jax.jit(loss_and_logits), nnx.to_pure_dict(state), g


def _grad(loss_and_logits):
  return jax.jit(jax.grad(loss_and_logits, has_aux=True))


@pytest.mark.parametrize("preset,io", CASES)
def test_logits_and_loss(golden_dir, preset, io):
  _, run, params, g = _problem(golden_dir, preset, io)
  loss, logits = run(params)
  assert logits.shape == g["logits_tf"].shape
  assert_close_rel(logits, g["logits_tf"], name="logits_tf")
  assert_close_rel(loss, g["train_loss"], name="train_loss")


def test_every_gradient_matches_official(golden_dir):
  var, run, params, g = _problem(golden_dir, *CASES[0])
  grad_keys = sorted(k for k in g if k.startswith("grad/"))
  assert len(grad_keys) == 34  # Every trainable parameter of var_tiny.pth.
  grads, _ = _grad(run)(params)
  state = nnx.state(var)
  nnx.replace_by_pure_dict(state, grads)
  flat = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}
  ours = export_flat(flat, var_rules(var.cfg))
  assert set(ours) == {k[len("grad/"):] for k in grad_keys}
  for k in grad_keys:
    assert_close_rel(ours[k[len("grad/"):]], g[k], name=k)


@pytest.mark.slow  # Finite differences over every parameter tensor.
def test_512px_shared_adaln_gradients_match_finite_differences(golden_dir):
  _, run, params, g = _problem(golden_dir, *CASES[1])
  assert not any(k.startswith("grad/") for k in g)  # Hence this check.
  grads, _ = _grad(run)(params)
  paths_p, tree = jax.tree_util.tree_flatten_with_path(params)
  leaves = [v for _, v in paths_p]
  g_leaves = jax.tree_util.tree_leaves(grads)
  names = [jax.tree_util.keystr(p) for p, _ in paths_p]
  assert "['shared_ada_lin']['kernel']" in names and len(names) == 23

  def loss_with(i, delta):
    return float(run(jax.tree_util.tree_unflatten(
        tree, leaves[:i] + [leaves[i] + delta] + leaves[i + 1:]))[0])

  errors = {}
  for i, (name, p, gr) in enumerate(zip(names, leaves, g_leaves)):
    # Along this parameter's own gradient the directional derivative is
    # |grad|; the step is ~1% of the parameter (float32 loss differences).
    norm = float(jnp.linalg.norm(gr))
    assert norm > 0, f"{name}: zero gradient"
    h = min(1e-2 * max(float(jnp.linalg.norm(p)), 1e-3), 0.1)
    d = gr / norm * h
    fd = (loss_with(i, d) - loss_with(i, -d)) / (2 * h)
    errors[name] = abs(fd - norm) / norm
  # Measured: at most 3e-3 (curvature over the finite step); a wrong
  # backward is off by far more.
  bad = {k: v for k, v in errors.items() if v > 1e-2}
  assert not bad, bad
