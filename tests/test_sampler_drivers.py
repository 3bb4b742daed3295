"""The two scale drivers (a Python loop of exact-size steps, a lax.scan over
padded groups of scales) draw the same tokens.

Random small models over five scales (128px; 1..8 tokens a side), so that
the scan groups scales and both programs compile in seconds; the
golden tests check each driver against the reference.
"""

import dataclasses
import functools

import numpy as np
import pytest
from golden_models import SMALL_VAE, random_model, small_var_config
from test_sampler_golden import guided_logits

from var_jax.models.var.transformer import VAR
from var_jax.models.var.vqvae import VQVAE
from var_jax.sampling.var.sampler import SampleOptions, Sampler

PATCH_NUMS = (1, 2, 4, 6, 8)


@functools.lru_cache(maxsize=None)
def _models():
  vae = random_model(VQVAE, dataclasses.replace(SMALL_VAE,
                                                v_patch_nums=PATCH_NUMS), 0)
  cfg = dataclasses.replace(small_var_config(), patch_nums=PATCH_NUMS)
  return vae, random_model(VAR, cfg, 1), random_model(VAR, cfg, 2)


@pytest.mark.slow  # Two compiled collaborative samplers.
def test_both_drivers_draw_the_same_tokens():
  # Stochastic sampling with everything that shapes the loop: a per-scale
  # schedule (static per scale in the Python loop, traced in the scan), a
  # collaborative pair (the refiner's prefill) and cfg_until (rows dropped
  # mid-run). Scale 0 with top-k 1 is the argmax whatever the temperature.
  # The layer loop is the same on both sides (the golden tests check each
  # layer layout against the reference).
  vae, drafter, refiner = _models()
  sched = dict(top_k=(1, 3, 0, 30, 10), top_p=(0.0, 0.0, 0.9, 0.5, 0.95),
               temperature=(3.0, 3.0, 1.1, 1.0, 0.9), draft_steps=2,
               cfg_until=4)
  runs = [Sampler(vae, refiner, SampleOptions(scale_loop=s, layer_loop=l,
                                              **sched),
                  drafter=drafter)([1, 6], seed=4)
          for s, l in (("python", "scan"), ("scan", "scan"))]
  for si in range(len(PATCH_NUMS)):
    np.testing.assert_array_equal(runs[1].idx[si], runs[0].idx[si])
  np.testing.assert_allclose(runs[1].images_BHWC, runs[0].images_BHWC,
                             atol=1e-5)
  # The draw is not trivially greedy: later scales leave the argmax.
  guided = guided_logits(vae, drafter, [1, 6], runs[0].idx, 1.5)
  np.testing.assert_array_equal(runs[0].idx[0], guided[0].argmax(-1))
  assert any((runs[0].idx[si] != guided[si].argmax(-1)).any()
             for si in (1, 2))
