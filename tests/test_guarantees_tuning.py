"""A stored CPU plan is used only on what it was measured with
(docs/guarantees.md#caches-are-keyed-on-content): another CPU, jax, jaxlib,
var-jax version or candidate set finds no plan, and `sample` uses XLA's
defaults until `var-jax tune` measures again."""

import jax
import jaxlib
import pytest

import var_jax
from var_jax.sampling import tuning

TINY = dict(embed_dim=64, dtype="float32", vae_ch=32, image_res=32, batch=2)
_RECORD = {"transformer_options": {}, "decoder_options": {},
           "decoder_batched": True, "bf16_speedup": None}


def _changes():
  def cpu(m):
    m.setattr(tuning, "_cpu_name", lambda: "Other CPU @ 9 GHz")

  def flags(m):
    m.setattr(tuning, "_cpu_flags", lambda: "fpu sse2")

  def jax_version(m):
    m.setattr(jax, "__version__", "0.0.1")

  def jaxlib_version(m):
    m.setattr(jaxlib, "__version__", "0.0.1")

  def ours(m):
    m.setattr(var_jax, "__version__", "9.9.9")

  def candidates(m):
    m.setitem(tuning._CANDIDATES, "new", (("xla_cpu_new_option", "1"),))  # pylint: disable=protected-access

  return [cpu, flags, jax_version, jaxlib_version, ours, candidates]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_a_plan_is_not_used_after_what_it_was_made_from_changed(
    tmp_path, monkeypatch, change):
  path = tmp_path / "cpu_plans.json"
  tuning.store_plan(path, tuning.plan_key(**TINY), _RECORD)
  assert tuning.stored_plan(path, tuning.plan_key(**TINY)) is not None
  with monkeypatch.context() as m:
    change(m)
    assert tuning.stored_plan(path, tuning.plan_key(**TINY)) is None
