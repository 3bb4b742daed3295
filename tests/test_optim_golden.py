"""The optimizer, schedule and loss against three official training steps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_rel
from flax import nnx
from golden_models import golden_vae, golden_var

from var_jax.models.var.config import get_preset
from var_jax.convert.rules import export_flat
from var_jax.convert.var.official_names import var_rules
from var_jax.training import loss as loss_lib
from var_jax.training import mesh as mesh_lib
from var_jax.training import optimizer as opt_lib
from var_jax.training import schedule, state, train_step
from var_jax.training.sharding import put_batch

# The golden run: lin0, peak lr 3e-4, wd 0.05, 4 warmup of 200 iterations.
SCHED = dict(peak_lr=3e-4, wd=0.05, wp_it=4, max_it=200, wp0=0.005,
             wpe=0.01)


@pytest.mark.parametrize("name,wd_end", [("const_wd", 0.05), ("cos_wd", 0.0)])
def test_schedule_tables(golden, name, wd_end):
  g = golden("var_tiny_optim")
  table = np.array([schedule.lr_wd("lin0", it, wd_end=wd_end, **SCHED)
                    for it in range(200)])
  np.testing.assert_allclose(table[:, 0], g[f"sched_lin0_{name}_lr"],
                             rtol=1e-12, atol=0)
  np.testing.assert_allclose(table[:, 1], g[f"sched_lin0_{name}_wd"],
                             rtol=1e-12, atol=1e-18)


def test_nowd_set(golden):
  """The no-decay set we derive from our own names is the official one."""
  g = golden("var_tiny_optim")
  cfg = get_preset("tiny").var
  mask = opt_lib.decay_mask(cfg)
  nowd = set()
  for r in var_rules(cfg):  # Our paths -> official names.
    if not r.derived:
      node = mask
      for k in r.path:
        node = node[k]
      if not node:
        nowd.add(r.official)
  assert sorted(nowd) == sorted(g["nowd_names"].tolist())


def _golden_batch(golden):
  io = golden("var_tiny_io")
  tokens = np.concatenate([io[f"idx_{i}"] for i in range(10)], 1)
  return {"tokens": tokens.astype(np.int32),
          "labels": io["label"].astype(np.int32)}


_SETUPS = {}


def _golden_setup(golden_dir, golden, **opts):
  """The golden model in eval mode with a jitted step over one device.

  The step (compiled on its first call) is made once per set of options and
  shared by the tests of this file; the state is fresh every time (the step
  donates it)."""
  key = tuple(sorted(opts.items()))
  if key not in _SETUPS:
    model_cfg = get_preset("tiny")
    cfg = dataclasses.replace(model_cfg.var, cond_drop_rate=0.0)
    model_cfg = dataclasses.replace(model_cfg, var=cfg)
    mesh = mesh_lib.make_mesh(None, jax.devices()[:1])
    tx = opt_lib.make_optimizer(cfg)
    spec = state.var_state_spec(cfg, tx, mesh)
    params = nnx.to_pure_dict(nnx.state(golden_var(golden_dir, "tiny")))
    vae_gd, vae_st, vae_sh = state.vae_state(golden_vae(golden_dir), mesh)
    step = train_step.make_train_step(
        model_cfg, spec, vae_gd, vae_sh, tx, mesh,
        train_step.StepOptions(tokens=True, dropout=False, **opts))
    batch = put_batch(_golden_batch(golden), mesh)
    _SETUPS[key] = (cfg, spec, tx, params, vae_st, step, batch)
  cfg, spec, tx, params, vae_st, step, batch = _SETUPS[key]
  st = state.state_from_params(spec, tx, params)
  return cfg, spec, st, vae_st, step, batch


def test_three_official_steps(golden_dir, golden):
  g = golden("var_tiny_optim")
  cfg, spec, st, vae_st, step, batch = _golden_setup(golden_dir, golden)
  weights = loss_lib.loss_weights(cfg.patch_nums)
  key = np.asarray(jax.random.PRNGKey(0))
  rules = var_rules(cfg)
  worst = {}
  for k in range(3):
    lr, wd = schedule.lr_wd("lin0", k, wd_end=0.05, **SCHED)
    st, m = step(st, vae_st, batch, *train_step.step_inputs(lr, wd, weights,
                                                            k), key)
    np.testing.assert_allclose(float(m["lr"]), g[f"step{k}_lr"], rtol=1e-6)
    np.testing.assert_allclose(float(m["wd"]), g[f"step{k}_wd"], rtol=1e-6)
    np.testing.assert_allclose(float(m["loss"]), g[f"step{k}_loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(float(m["grad_norm"]), g[f"step{k}_grad_norm"],
                               rtol=1e-5)
    flat = {p: np.asarray(v) for p, v in
            nnx.to_flat_state(nnx.State(st["params"]))}
    ours = export_flat(flat, rules)
    names = [n[len(f"step{k}_param/"):] for n in g
             if n.startswith(f"step{k}_param/")]
    assert set(names) == set(ours)
    for n in names:
      err = assert_close_rel(ours[n], g[f"step{k}_param/{n}"],
                             name=f"step{k} {n}")
      worst[n] = max(worst.get(n, 0.0), err)
  # Label smoothing 0.1 on the weights after the third step.
  var = nnx.merge(spec.graphdef, st["params"])
  io = golden("var_tiny_io")
  logits = var(jnp.asarray(io["label"]), jnp.asarray(io["var_input"]))
  tgt = jnp.asarray(_golden_batch(golden)["tokens"])
  ls = loss_lib.weighted_loss(logits, tgt, jnp.asarray(weights), 0.1)
  np.testing.assert_allclose(float(ls), g["ls0.1_loss"], rtol=1e-5)


def test_torch_adamw_formula():
  """One hand-checked AdamW step with decay on one leaf and not the other."""
  tx = opt_lib.torch_adamw(0.1, 0.5, decay_mask={"a": True, "b": False})
  p = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])}
  gr = {"a": jnp.array([0.5, 0.25]), "b": jnp.array([-1.0])}
  upd, _ = tx.update(gr, tx.init(p), p)
  new = jax.tree.map(jnp.add, p, upd)
  # Step 1: m/(1-b1) = g, sqrt(v/(1-b2)) = |g| -> adam step = lr * sign(g).
  np.testing.assert_allclose(new["a"], np.array([1.0, -2.0]) * (1 - 0.05)
                             - 0.1 * np.sign([0.5, 0.25]), rtol=1e-6)
  np.testing.assert_allclose(new["b"], [3.0 + 0.1], rtol=1e-6)


_STEP_CACHE = {}


def _one_step(golden_dir, golden, **opts):
  """Params and metrics after one step from the golden weights (cached)."""
  key = tuple(sorted(opts.items()))
  if key not in _STEP_CACHE:
    _STEP_CACHE[key] = _one_step_uncached(golden_dir, golden, **opts)
  return _STEP_CACHE[key]


def _one_step_uncached(golden_dir, golden, **opts):
  cfg, _, st, vae_st, step, batch = _golden_setup(golden_dir, golden, **opts)
  w = loss_lib.loss_weights(cfg.patch_nums)
  lr, wd = schedule.lr_wd("lin0", 4, wd_end=0.05, **SCHED)
  st, m = step(st, vae_st, batch, *train_step.step_inputs(lr, wd, w, 4),
               np.asarray(jax.random.PRNGKey(0)))
  return jax.tree.map(np.asarray, st["params"]), jax.device_get(m)


@pytest.mark.slow  # A second compiled train step.
def test_grad_accumulation_equals_full_batch(golden_dir, golden):
  full_p, full_m = _one_step(golden_dir, golden)
  acc_p, acc_m = _one_step(golden_dir, golden, grad_accum=2)
  np.testing.assert_allclose(acc_m["loss"], full_m["loss"], rtol=1e-6)
  np.testing.assert_allclose(acc_m["grad_norm"], full_m["grad_norm"],
                             rtol=1e-5)
  np.testing.assert_allclose(acc_m["scale_loss"], full_m["scale_loss"],
                             rtol=1e-6)
  for a, b in zip(jax.tree.leaves(acc_p), jax.tree.leaves(full_p)):
    assert_close_rel(a, b, rel=1e-5)


@pytest.mark.slow  # A third compiled train step.
def test_bfloat16_compute_keeps_float32_weights(golden_dir, golden):
  f32_p, f32_m = _one_step(golden_dir, golden)
  bf_p, bf_m = _one_step(golden_dir, golden, dtype="bfloat16")
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf_p))
  np.testing.assert_allclose(bf_m["loss"], f32_m["loss"], rtol=1e-2)
  np.testing.assert_allclose(bf_m["grad_norm"], f32_m["grad_norm"], rtol=5e-2)
