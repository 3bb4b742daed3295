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
  # Sampling it is the bundled model's own tests' claim (test_default_model,
  # and examples/quickstart.py end to end).


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
  # Every reader of a model directory takes the name (the commands' --ckpt
  # go through checkpoint.load_model / load_config).
  assert checkpoint.model_dir("d16") == d
  cfg, _, var = checkpoint.load_model("d16")
  assert cfg.name == "tiny" and var.cfg.depth == m.var.cfg.depth


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


def test_bundled_models_are_named():
  assert api.model_dir() == api.model_dir("digits") == checkpoint.DEFAULT_MODEL
  refiner = api.model_dir("digits_refiner")
  assert refiner == checkpoint.DEFAULT_MODEL.with_name("digits_refiner")
  # Only a str is a name: a Path is a directory, whatever it is called.
  assert api.model_dir(checkpoint.DEFAULT_MODEL.parent.parent / "d16") == (
      checkpoint.DEFAULT_MODEL.parent.parent / "d16")
  assert api.model_names() == ("digits", "digits_refiner", *dl.MODELS)
  # The refiner ships without a tokenizer: it comes with the digits one.
  m, digits = var_jax.load("digits_refiner"), var_jax.load("digits")
  assert m.path == refiner and m.var.cfg.depth < digits.var.cfg.depth
  a, b = _params(m.vae), _params(digits.vae)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_catalog_lists_presets_configs_and_models(tmp_path):
  groups = dict(api.catalog(models_dir=tmp_path))
  assert list(groups) == [
      "model presets (convert / bench --preset; a training config's model)",
      "training configs (train / train-vae --config NAME; plan --preset "
      "NAME)",
      "bundled models (--ckpt NAME; shipped, no download)",
      f"released models (--ckpt NAME, var_jax.load(NAME); downloaded once "
      f"into {tmp_path})"]
  presets, configs, bundled, released = (dict(rows)
                                         for rows in groups.values())
  from var_jax.configs.models import PRESETS
  assert list(presets) == list(PRESETS)
  assert presets["vqvae"] == "tokenizer only, 109M parameters; 256px"
  # The released family's sizes, as the VAR paper gives them.
  for name, size in (("d16", "310M"), ("d20", "601M"), ("d24", "1.03B"),
                     ("d30", "2.01B"), ("d36", "2.35B")):
    assert presets[name].startswith(f"VAR {size} + tokenizer 109M "), name
    assert released[name].startswith(presets[name] + "; download about ")
  assert released["d16"].endswith("download about 1.7 GB")
  assert "512px" in released["d36"]
  assert {"train_d16", "train_digits", "train_vae_digits"} <= set(configs)
  assert configs["train_digits"].startswith("The bundled default model's")
  assert list(bundled) == ["digits", "digits_refiner"]
  assert bundled["digits"] == presets["digits"]
  assert bundled["digits_refiner"].startswith(
      "VAR 701K parameters, with the digits tokenizer; 64px, 10 classes")
  assert list(tmp_path.iterdir()) == []  # Looked at, never created.
  # A kept model is marked.
  (tmp_path / "d20").mkdir()
  (tmp_path / "d20" / "config.json").write_text("{}")
  released = dict(dict(api.catalog(models_dir=tmp_path))[
      f"released models (--ckpt NAME, var_jax.load(NAME); downloaded once "
      f"into {tmp_path})"])
  assert released["d20"].endswith("; downloaded")
  assert not released["d16"].endswith("; downloaded")


def test_one_tokenizer_trace_serves_every_scale_list():
  # parameter_counts traces each tokenizer with one scale: the count is
  # the same as with the preset's own list (256px and 512px alike).
  from var_jax.configs.models import PRESETS
  cfg = PRESETS["tiny_saln512"]
  assert api.parameter_counts(cfg)[1] == api._count("vae", cfg.vae)
