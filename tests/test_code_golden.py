"""Collaborative decoding, per-scale schedules, cfg_until vs the reference.

The golden CoDe outputs (`code_tiny_io.npz`) come from czg1225/CoDe's
`autoregressive_infer_cfg_draft` / `_refine` with `var_tiny.pth` as the
drafter and `var_tiny_refiner.pth` as the refiner (see the golden README).
"""

import functools

import jax
import numpy as np
import pytest
from golden_models import golden_vae, golden_var, official_model
from test_sampler_golden import (GREEDY, _nchw_to_nhwc, assert_tokens_equal,
                                 guided_logits)

from var_jax.convert.var import load
from var_jax.convert.var.convert import read_official
from var_jax.models.var.transformer import VAR
from var_jax.sampling import filtering
from var_jax.sampling.var.sampler import SampleOptions, Sampler


@functools.lru_cache(maxsize=None)
def golden_refiner(golden_dir):
  sd = read_official(golden_dir / "var_tiny_refiner.pth", "var")
  return official_model(VAR, load.infer_var_config(sd), var_sd=sd)


def _assert_image_close(ours, ref_nchw):
  err = np.abs(np.asarray(ours) - _nchw_to_nhwc(ref_nchw)).max()
  assert err <= 1e-3, err


@pytest.mark.parametrize("n", [4, 6, 8])
def test_code_greedy_tokens_and_images(golden_dir, golden, n):
  g, io = golden("code_tiny_io"), golden("var_tiny_io")
  vae, drafter = golden_vae(golden_dir), golden_var(golden_dir)
  refiner = golden_refiner(golden_dir)
  # The commands' loops for a one-call job (scan); the Python driver draws
  # the same tokens (test_sampler_drivers.py).
  for cfg in (1.5, 4.0):  # cfg is data: one compiled program for both.
    opts = SampleOptions(cfg=cfg, draft_steps=n, scale_loop="scan",
                         layer_loop="scan", **GREEDY)
    out = Sampler(vae, refiner, opts, drafter=drafter)(io["label"], seed=0)
    pre = f"code_cfg{cfg}_N{n}"
    for si in range(10):
      assert_tokens_equal(out.idx[si], g[f"{pre}_idx_{si}"],
                          name=f"{pre}_idx_{si}")
    _assert_image_close(out.images_BHWC, g[f"{pre}_img"])


def test_refiner_alone_matches_official(golden_dir, golden):
  g, io = golden("code_tiny_io"), golden("var_tiny_io")
  vae, refiner = golden_vae(golden_dir), golden_refiner(golden_dir)
  opts = SampleOptions(cfg=1.5, scale_loop="scan", layer_loop="scan", **GREEDY)
  out = Sampler(vae, refiner, opts)(io["label"])
  _assert_image_close(out.images_BHWC, g["refiner_greedy_cfg1.5_img"])


@pytest.mark.slow  # Several compiled samplers (minutes on 2 cores).
def test_code_draws_the_drafters_tokens_for_its_scales(golden_dir):
  # Stochastic sampling: the drafter's scales of a CoDe run are those of a
  # plain drafter run with the same seed (keys depend on scale, sample,
  # position only); the refiner's scales differ from the plain run's.
  vae, drafter = golden_vae(golden_dir), golden_var(golden_dir)
  refiner = golden_refiner(golden_dir)
  labels, n = [2, 9, 4], 5
  plain = Sampler(vae, drafter, SampleOptions(top_k=50, top_p=0.9))(
      labels, seed=11)
  pair = Sampler(vae, refiner, SampleOptions(top_k=50, top_p=0.9,
                                             draft_steps=n),
                 drafter=drafter)(labels, seed=11)
  for si in range(n):
    np.testing.assert_array_equal(pair.idx[si], plain.idx[si])
  assert not np.array_equal(pair.idx[-1], plain.idx[-1])


def test_per_scale_filter_equals_official_masks(golden):
  # The five golden (top_k, top_p) settings as five scales of one schedule,
  # filtered with traced per-scale values (as the scan form does).
  g = golden("topk_topp")
  settings = [(5, 0.0), (0, 0.9), (10, 0.8), (1, 0.0), (0, 0.5)]
  ks = np.asarray([k for k, _ in settings], np.int32)
  ps = np.asarray([p for _, p in settings], np.float32)
  budgets = np.asarray([filtering.top_p_budget(p) for _, p in settings])

  @jax.jit
  def masks(logits, ks, ps, budgets):
    one = lambda a: filtering.keep_mask(logits, a[0], (a[1], a[2]))
    return jax.lax.map(one, (ks, ps, budgets))

  out = np.asarray(masks(g["logits"], ks, ps, budgets))
  for i, (k, p) in enumerate(settings):
    np.testing.assert_array_equal(out[i], g[f"keep_k{k}_p{p}"],
                                  err_msg=f"k={k} p={p}")


@pytest.mark.slow  # Several compiled samplers (minutes on 2 cores).
def test_temperature_divides_after_filtering(golden_dir):
  # A huge temperature makes the draw uniform over the keep set, and that
  # set is decided on the untempered guided logits: every drawn token lies
  # in the top-p set of the (untempered) guided logits. Had the
  # temperature flattened the logits first, top-p 0.5 would keep half the
  # vocabulary and most draws would fall outside it.
  vae, var = golden_vae(golden_dir), golden_var(golden_dir)
  opts = SampleOptions(top_k=0, top_p=0.5, temperature=1e4)
  out = Sampler(vae, var, opts)([3, 7, 1, 5], seed=2)
  guided = guided_logits(vae, var, [3, 7, 1, 5], out.idx, opts.cfg)
  off_argmax = sizes = 0
  for si in range(10):
    logits = guided[si]
    keep = np.asarray(filtering.keep_mask(logits, 0, 0.5))
    idx = np.asarray(out.idx[si])
    assert np.take_along_axis(keep, idx[..., None], -1).all(), si
    off_argmax += (idx != logits.argmax(-1)).sum()
    sizes += keep.sum(-1).max()
  assert off_argmax > 0 and sizes > 10  # The temperature did act.


def test_cfg_until_k_is_plain_sampling(golden_dir, golden):
  io = golden("var_tiny_io")
  vae, var = golden_vae(golden_dir), golden_var(golden_dir)
  out = Sampler(vae, var, SampleOptions(cfg=1.5, cfg_until=10, **GREEDY))(
      io["label"])
  for si in range(10):
    np.testing.assert_array_equal(out.idx[si], io[f"greedy_cfg1.5_idx_{si}"])
  _assert_image_close(out.images_BHWC, io["greedy_cfg1.5_img"])


@pytest.mark.slow  # Several compiled samplers (minutes on 2 cores).
def test_cfg_until_drops_the_null_rows(golden_dir, golden):
  # cfg_until=6: scales 0..5 are guided (equal to the official greedy
  # run), scales 6.. run B rows without guidance. With cfg=0 guidance is the
  # identity, so dropping the null rows from scale 1 on must not change a
  # token: the B-row program reads the right rows of the 2B-row cache.
  io = golden("var_tiny_io")
  vae, var = golden_vae(golden_dir), golden_var(golden_dir)
  labels = io["label"]
  out = Sampler(vae, var, SampleOptions(cfg=1.5, cfg_until=6, **GREEDY))(
      labels)
  for si in range(6):
    np.testing.assert_array_equal(out.idx[si], io[f"greedy_cfg1.5_idx_{si}"])
  plain0 = Sampler(vae, var, SampleOptions(cfg=0.0, **GREEDY))(labels)
  drop0 = Sampler(vae, var, SampleOptions(cfg=0.0, cfg_until=1, **GREEDY))(
      labels)
  logits = guided_logits(vae, var, labels, plain0.idx, 0.0)
  for si in range(10):
    assert_tokens_equal(drop0.idx[si], plain0.idx[si], logits[si],
                        name=f"idx_{si}")
  np.testing.assert_allclose(drop0.images_BHWC, plain0.images_BHWC,
                             atol=1e-5)


@pytest.mark.slow  # Several compiled samplers (minutes on 2 cores).
def test_code_composes_with_cfg_until(golden_dir, golden):
  g, io = golden("code_tiny_io"), golden("var_tiny_io")
  vae, drafter = golden_vae(golden_dir), golden_var(golden_dir)
  refiner = golden_refiner(golden_dir)
  opts = SampleOptions(cfg=4.0, draft_steps=4, cfg_until=7, **GREEDY)
  out = Sampler(vae, refiner, opts, drafter=drafter)(io["label"])
  for si in range(7):  # Guided up to scale 6: the reference's tokens.
    assert_tokens_equal(out.idx[si], g[f"code_cfg4.0_N4_idx_{si}"],
                        name=f"idx_{si}")
  img = np.asarray(out.images_BHWC)
  assert np.isfinite(img).all() and 0 <= img.min() and img.max() <= 1
