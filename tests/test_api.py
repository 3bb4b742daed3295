"""The public names of `import var_jax`: cheap to import, `load` by path or
released name, and the sampling and training entry points.

The released-name path runs offline: the fetch serves the golden tiny
`.pth` files (checked against the `tiny` preset), and a second load must
find the kept directory without fetching.
"""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import var_jax
from var_jax import api, checkpoint
from var_jax.convert.var import download as dl
from var_jax.errors import CheckpointError, DownloadError
from var_jax.models.var.transformer import VAR
from var_jax.models.var.vqvae import VQVAE

_PROBE = r"""
import json, sys
import var_jax
heavy = ("jax", "flax", "orbax.checkpoint", "tensorstore")
seen = {"import": [m for m in heavy if m in sys.modules]}
var_jax.load, var_jax.Sampler, var_jax.SampleOptions
seen["names"] = [m for m in heavy if m in sys.modules]
print(json.dumps(seen))
"""


def test_import_loads_no_jax_until_a_name_is_used():
  p = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  seen = json.loads(p.stdout.strip().splitlines()[-1])
  assert seen["import"] == []
  assert "jax" in seen["names"]  # The sampler needs JAX: loaded on use.


def test_public_names_are_the_library_entry_points():
  from var_jax.sampling.var import sampler
  from var_jax.training import config, trainer
  assert var_jax.Sampler is sampler.Sampler
  assert var_jax.SampleOptions is sampler.SampleOptions
  assert var_jax.train is trainer.train
  assert var_jax.TrainConfig is config.TrainConfig
  assert var_jax.load is api.load
  assert {"load", "Sampler", "SampleOptions", "train"} <= set(dir(var_jax))
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    var_jax.nope  # pylint: disable=pointless-statement
  assert not hasattr(var_jax, "Load")


def _params(module) -> dict:
  return {"/".join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(module))}


def _same_weights(got, directory):
  _, vae, var = checkpoint.load_model(directory)
  for mine, theirs in ((got.vae, vae), (got.var, var)):
    a, b = _params(mine), _params(theirs)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _same_model(got, directory):
  assert got.config == checkpoint.load_config(directory)
  assert isinstance(got.vae, VQVAE) and isinstance(got.var, VAR)
  _same_weights(got, directory)


def test_load_without_arguments_is_the_bundled_model():
  m = var_jax.load()
  _same_model(m, checkpoint.DEFAULT_MODEL)
  assert m.config.var.num_classes == 10
  with pytest.raises(dataclasses.FrozenInstanceError):
    m.var = None
  out = var_jax.Sampler(m.vae, m.var, var_jax.SampleOptions())([3], seed=0)
  side = m.config.vae.resolution
  assert out.images_BHWC.shape == (1, side, side, 3)


def test_load_a_converted_directory(model_dir):
  m = var_jax.load(str(model_dir))
  _same_model(m, model_dir)
  assert m.path == model_dir
  assert var_jax.load(model_dir).config == m.config  # A Path works too.


def _golden_fetch(golden_dir, calls):
  def fetch(model, cache_dir, pth_dir):
    calls.append(model)
    return golden_dir / "vae_tiny.pth", golden_dir / "var_tiny.pth"
  return fetch


def _no_network(*args):
  raise AssertionError(f"fetched again: {args}")


def test_a_released_name_is_fetched_and_converted_once(
    golden_dir, model_dir, tmp_path, monkeypatch):
  calls = []
  kept = tmp_path / "models"
  d = api.released_model_dir("d16", models_dir=kept, preset="tiny",
                             fetch=_golden_fetch(golden_dir, calls))
  assert d == kept / "d16" and calls == ["d16"]
  # Any further fetch would go to the network: refuse it.
  monkeypatch.setattr(dl, "fetch_files", _no_network)
  assert api.released_model_dir("d16", models_dir=kept,
                                fetch=_no_network) == d
  m = var_jax.load("d16", models_dir=kept)
  assert m.path == d
  _same_model(m, d)
  assert m.config.name == "tiny"  # Checked against the preset asked for.
  _same_weights(m, model_dir)  # The golden tiny files, converted as usual.
  # The default place is $VAR_JAX_MODELS.
  monkeypatch.setenv(api.MODELS_ENV, str(kept))
  assert api.default_models_dir() == kept
  assert var_jax.load("d16").path == d


def test_default_models_dir_is_under_the_user_cache(monkeypatch, tmp_path):
  monkeypatch.delenv(api.MODELS_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert api.default_models_dir() == tmp_path / "var-jax" / "models"
  assert not (tmp_path / "var-jax").exists()  # Named, never created.


def test_unknown_names_and_missing_directories_are_named(tmp_path):
  with pytest.raises(CheckpointError, match="d17: no such model directory, "
                     "and not a released model"):
    var_jax.load("d17")
  missing = tmp_path / "nowhere"
  with pytest.raises(CheckpointError, match=f"{missing}: no such model"):
    var_jax.load(missing)
  with pytest.raises(DownloadError, match="unknown model 'd17'"):
    api.released_model_dir("d17", models_dir=tmp_path)
  assert list(tmp_path.iterdir()) == []
