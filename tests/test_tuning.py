"""CPU tuning: measured only when asked (`var-jax tune`), stored, passed in."""

import json

import numpy as np
import pytest
from golden_models import golden_vae, golden_var

from var_jax import cli
from var_jax.sampling import tuning
from var_jax.sampling.tuning import NO_YNN, CpuPlan, TuningError
from var_jax.sampling.var.sampler import SampleOptions, Sampler

# A tiny probe (64-wide matmul, 32-channel block at 32px): the code path of
# the full-size one, a few seconds here.
TINY = dict(embed_dim=64, dtype="float32", vae_ch=32, image_res=32, batch=2)


def test_probe_times_every_candidate_and_the_plan_round_trips(tmp_path):
  plan, record = tuning.probe(**TINY)
  assert {"mm/xla-default", "mm/no-ynnpack"} <= set(record["seconds"])
  assert plan.transformer_options in (NO_YNN, ())
  path = tmp_path / "plans.json"
  key = tuning.plan_key(**TINY)
  assert tuning.stored_plan(path, key) is None
  tuning.store_plan(path, key, record)
  assert tuning.stored_plan(path, key) == plan
  assert tuning.stored_plan(path, tuning.plan_key(**dict(TINY, batch=1))) \
      is None


@pytest.mark.parametrize("text", ["{not json", "[1, 2]",
                                  '{"K": {"decoder_batched": 1}}'])
def test_a_bad_plan_file_is_one_error_naming_it(tmp_path, text):
  path = tmp_path / "plans.json"
  path.write_text(text)
  with pytest.raises(TuningError, match="plans.json"):
    tuning.stored_plan(path, "K")


def test_library_sampling_writes_nothing_under_home(golden_dir, tmp_path,
                                                    monkeypatch):
  home = tmp_path / "home"
  home.mkdir()
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  # The golden greedy options: the program the golden sampler cases of this
  # worker compile (compiling is no library side effect: the persistent
  # compilation cache stays off, test_compile_cache).
  vae, var = golden_vae(golden_dir), golden_var(golden_dir)
  opts = SampleOptions(cfg=1.5, top_k=1, top_p=0.0, scale_loop="scan",
                       layer_loop="scan")
  out = Sampler(vae, var, opts)([3, 7], seed=0)
  assert np.isfinite(np.asarray(out.images_BHWC)).all()
  assert list(home.iterdir()) == []


@pytest.mark.slow  # End to end: `var-jax tune` on the bundled model.
def test_tune_stores_what_sample_reads(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  from var_jax.sampling import jobs
  from var_jax import checkpoint
  _, vae, var = checkpoint.load_model(None, need_var=True)
  plan, notice = jobs.stored_tuning(vae, var, "float32", 8)
  assert plan is None and "var-jax tune" in notice
  assert cli.main(["--no-compile-cache", "tune"]) == 0
  assert "stored in" in capsys.readouterr().out
  stored = json.loads((tmp_path / "var-jax" / tuning.PLAN_FILE).read_text())
  assert len(stored) == 2  # One-image and several-image calls.
  plan, notice = jobs.stored_tuning(vae, var, "float32", 8)
  assert isinstance(plan, CpuPlan) and notice is None


@pytest.mark.parametrize("plan", [
    CpuPlan(decoder_options=NO_YNN, decoder_batched=True),
    pytest.param(CpuPlan(transformer_options=NO_YNN, decoder_options=NO_YNN,
                         decoder_batched=False), marks=pytest.mark.slow),
])
def test_every_plan_samples_the_golden_tokens(golden_dir, golden, plan):
  """Plans change kernels, not results: greedy golden tokens and images."""
  g = golden("var_tiny_io")
  vae, var = golden_vae(golden_dir), golden_var(golden_dir)
  opts = SampleOptions(cfg=1.5, top_k=1, top_p=0.0, scale_loop="scan",
                       layer_loop="scan")
  sampler = Sampler(vae, var, opts, tuning=plan)
  out = sampler(g["label"], seed=0)
  for si in range(len(var.cfg.patch_nums)):
    np.testing.assert_array_equal(out.idx[si], g[f"greedy_cfg1.5_idx_{si}"])
  ref = np.transpose(g["greedy_cfg1.5_img"], (0, 2, 3, 1))
  assert np.abs(np.asarray(out.images_BHWC) - ref).max() <= 1e-3
  # The options reached the compiler: no YNNPACK fusion where it was off.
  scales, decoder = sampler.lower(len(g["label"]))
  assert ("ynn" in decoder.compile().as_text()) is (
      plan.decoder_options == ())
  if plan.transformer_options:
    assert "ynn" not in scales.compile().as_text()
