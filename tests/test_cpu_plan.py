"""The per-machine CPU plan: measured once, cached, applied, never fatal."""

import json
import logging
import os

import numpy as np
import pytest
from golden_models import golden_vae, golden_var

from var_jax.sampling import cpu_plan
from var_jax.sampling.cpu_plan import NO_YNN, CpuPlan
from var_jax.sampling.var.sampler import SampleOptions, Sampler

# A tiny probe (64-wide matmul, 16-channel block at 32px): same code path as
# the full-size one, a few seconds here.
TINY = dict(embed_dim=64, dtype="float32", vae_ch=32, image_res=32, batch=2)


def _plan(tmp_path, monkeypatch, mode="auto", **kw):
  monkeypatch.setenv(cpu_plan.PLAN_ENV, mode)
  return cpu_plan.plan_for(**dict(TINY, **kw),
                           cache_file=str(tmp_path / "plans.json"))


def test_off_is_xla_defaults_and_one_image_at_a_time(tmp_path, monkeypatch):
  plan = _plan(tmp_path, monkeypatch, "off")
  assert plan == cpu_plan.OFF
  assert plan.transformer_options == () and not plan.decoder_batched
  assert not (tmp_path / "plans.json").exists()


def test_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
  first = _plan(tmp_path, monkeypatch)
  assert first.source == "probe"
  stored = json.loads((tmp_path / "plans.json").read_text())
  (key,) = stored
  assert key == cpu_plan.machine_key(**TINY)
  rec = stored[key]
  # Every candidate was timed; the choice is one of them.
  assert {"mm/xla-default", "dec/xla-default/batched",
          "dec/xla-default/per-image"} <= set(rec["seconds"])
  assert all(v > 0 for v in rec["seconds"].values())
  assert rec["decoder_options"] in ({}, dict(NO_YNN))
  second = _plan(tmp_path, monkeypatch)
  assert second.source == "cache" and second == first
  # Another dtype is another machine key: measured, stored beside the first.
  bf = _plan(tmp_path, monkeypatch, dtype="bfloat16")
  assert bf.source == "probe" and bf.bf16_speedup > 0
  assert len(json.loads((tmp_path / "plans.json").read_text())) == 2


def test_probe_mode_measures_again(tmp_path, monkeypatch):
  _plan(tmp_path, monkeypatch)
  before = json.loads((tmp_path / "plans.json").read_text())
  again = _plan(tmp_path, monkeypatch, "probe")
  assert again.source == "probe"
  after = json.loads((tmp_path / "plans.json").read_text())
  key = cpu_plan.machine_key(**TINY)
  assert after[key]["seconds"] != before[key]["seconds"]


def test_a_corrupt_cache_is_replaced_with_a_warning(tmp_path, monkeypatch,
                                                    caplog):
  (tmp_path / "plans.json").write_text("{not json")
  with caplog.at_level(logging.WARNING, logger="var_jax"):
    plan = _plan(tmp_path, monkeypatch)
  assert plan.source == "probe"
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1 and "unreadable" in lines[0], lines
  assert cpu_plan.machine_key(**TINY) in json.loads(
      (tmp_path / "plans.json").read_text())


_SLOW = pytest.mark.slow  # Each case measures the CPU again (a few seconds).


@pytest.mark.parametrize("entry", [
    [1, 2],
    pytest.param("str", marks=_SLOW),
    pytest.param({"decoder_batched": "x"}, marks=_SLOW),
    pytest.param({"transformer_options": [1], "decoder_options": {},
                  "decoder_batched": True}, marks=_SLOW),
    {"transformer_options": {"bogus_flag": "1"}, "decoder_options": {},
     "decoder_batched": True},
    pytest.param({"transformer_options": {}, "decoder_options":
                  {"xla_cpu_experimental_ynn_fusion_type": None},
                  "decoder_batched": True}, marks=_SLOW),
    {"transformer_options": {}, "decoder_options": {},
     "decoder_batched": "false"},
])
def test_a_malformed_entry_is_measured_again_in_one_line(
    tmp_path, monkeypatch, caplog, entry):
  key = cpu_plan.machine_key(**TINY)
  (tmp_path / "plans.json").write_text(json.dumps({key: entry}))
  with caplog.at_level(logging.WARNING, logger="var_jax"):
    plan = _plan(tmp_path, monkeypatch)
  assert plan.source == "probe"
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1 and "malformed" in lines[0], lines
  stored = json.loads((tmp_path / "plans.json").read_text())[key]
  assert isinstance(stored["decoder_batched"], bool)


def test_an_unwritable_cache_costs_a_warning_not_the_run(tmp_path, monkeypatch,
                                                          caplog):
  blocked = tmp_path / "file"
  blocked.write_text("x")  # A file where the cache directory should be.
  monkeypatch.setenv(cpu_plan.PLAN_ENV, "auto")
  with caplog.at_level(logging.WARNING, logger="var_jax"):
    plan = cpu_plan.plan_for(**TINY, cache_file=str(blocked / "plans.json"))
  assert plan.source == "probe"
  assert "could not store" in caplog.text
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_unknown_mode_means_auto(tmp_path, monkeypatch, caplog):
  with caplog.at_level(logging.WARNING, logger="var_jax"):
    plan = _plan(tmp_path, monkeypatch, "sometimes")
  assert plan.source == "probe" and "sometimes" in caplog.text


@pytest.mark.parametrize("plan", [
    CpuPlan(decoder_options=NO_YNN, decoder_batched=True),
    CpuPlan(transformer_options=NO_YNN, decoder_options=NO_YNN,
            decoder_batched=False),
])
def test_every_plan_samples_the_golden_tokens(golden_dir, golden, plan):
  """Plans change kernels, not results: greedy golden tokens and images."""
  g = golden("var_tiny_io")
  vae, var = golden_vae(golden_dir), golden_var(golden_dir)
  opts = SampleOptions(cfg=1.5, top_k=1, top_p=0.0)
  sampler = Sampler(vae, var, opts, cpu_plan=plan)
  out = sampler(g["label"], seed=0)
  for si in range(len(var.cfg.patch_nums)):
    np.testing.assert_array_equal(out.idx[si], g[f"greedy_cfg1.5_idx_{si}"])
  ref = np.transpose(g["greedy_cfg1.5_img"], (0, 2, 3, 1))
  assert np.abs(np.asarray(out.images_BHWC) - ref).max() <= 1e-3
  # The options reached the compiler: no YNNPACK fusion where it was off.
  scales, decoder = (l.compile() for l in sampler.lower(len(g["label"])))
  assert ("ynn" in decoder.as_text()) is (plan.decoder_options == ())
  if plan.transformer_options:
    assert "ynn" not in scales.as_text()
