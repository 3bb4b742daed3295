"""Caches are keyed on content (docs/guarantees.md, "Caches keyed on
content"): `eval` feature caches carry a fingerprint of the images they were
made from (a content hash of an npz, name + size + mtime of folder files)
and of the Inception weights; token caches carry the fingerprint of the
tokenizer that wrote them. A content change under an unchanged name is
refused. `eval` checks its inputs before it writes a cache.
"""

import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from var_jax.errors import DataError
from var_jax.eval import features as F
from var_jax.eval import inputs, suite


def _images(seed, n, h=8, w=8):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), np.uint8)


def _fake_features(n):
  from var_jax.models.inception import FEATURE_DIMS
  return {k: np.zeros((n, FEATURE_DIMS[k]), np.float32)
          for k in F.ADM_FEATURES}


def _cache_for(source, path):
  F.write_cache(path, _fake_features(source.n),
                F.cache_meta(source, "weights0"))


def test_npz_content_change_under_the_same_name_is_refused(tmp_path):
  samples, cache = tmp_path / "s.npz", tmp_path / "sc.npz"
  np.savez(samples, arr_0=_images(0, 4))
  _cache_for(inputs.open_images(samples), cache)
  same = inputs.open_images(samples)
  assert F.read_cache(cache, F.cache_meta(same, "weights0")) is not None
  # Other pixels, same name, count and shape.
  np.savez(samples, arr_0=_images(1, 4))
  changed = inputs.open_images(samples)
  with pytest.raises(DataError) as e:
    F.read_cache(cache, F.cache_meta(changed, "weights0"))
  assert str(e.value) == (f"feature cache {cache} was made from other images "
                          "or Inception weights (image content differ); "
                          "delete it or pass another cache path")


def test_folder_content_change_under_the_same_name_is_refused(tmp_path):
  d, cache = tmp_path / "imgs", tmp_path / "sc.npz"
  d.mkdir()
  for i, img in enumerate(_images(0, 3)):
    Image.fromarray(img).save(d / f"{i}.png")
  _cache_for(inputs.open_images(d), cache)
  assert F.read_cache(cache, F.cache_meta(inputs.open_images(d), "weights0"))
  Image.fromarray(_images(5, 1)[0]).save(d / "1.png")  # Rewritten in place.
  st = os.stat(d / "1.png")
  os.utime(d / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
  with pytest.raises(DataError, match=r"\(image content differ\)"):
    F.read_cache(cache, F.cache_meta(inputs.open_images(d), "weights0"))


def test_npz_hash_is_computed_while_streaming(tmp_path):
  samples = tmp_path / "s.npz"
  np.savez(samples, arr_0=_images(0, 5))
  src = inputs.open_images(samples)
  assert src._digest is None
  for _ in src.batches(0, 5, 2):  # The network's read of every image.
    pass
  streamed = src._digest
  assert streamed is not None
  assert inputs.open_images(samples).fingerprint() == streamed  # Own pass.
  part = inputs.open_images(samples)
  for _ in part.batches(1, 5, 2):  # A share of the images: no hash.
    pass
  assert part._digest is None


def test_other_weights_are_refused(tmp_path):
  samples, cache = tmp_path / "s.npz", tmp_path / "sc.npz"
  np.savez(samples, arr_0=_images(0, 4))
  src = inputs.open_images(samples)
  _cache_for(src, cache)
  with pytest.raises(DataError, match=r"\(Inception weights differ\)"):
    F.read_cache(cache, F.cache_meta(src, "weights1"))


@pytest.mark.parametrize("metrics,n_samples,n_ref,needle", [
    ("fid", 1, 6, "FID needs at least 2 sample images"),
    ("sfid", 6, 1, "sFID needs at least 2 reference images"),
    ("pr", 3, 6, "precision needs at least 4 sample images"),
    ("recall", 6, 3, "recall needs at least 4 reference images"),
])
def test_too_few_images_are_refused_before_any_work(tmp_path, metrics,
                                                    n_samples, n_ref, needle):
  samples, ref = tmp_path / "s.npz", tmp_path / "r.npz"
  np.savez(samples, arr_0=_images(0, n_samples))
  np.savez(ref, arr_0=_images(1, n_ref))
  with pytest.raises(DataError, match=needle):
    suite.plan(samples, ref, metrics, sample_cache=tmp_path / "sc.npz")
  # The Inception Score takes one image.
  suite.plan(samples, None, "is")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  from pth_writer import write_pth

  from var_jax.convert import inception as ci
  path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
  write_pth(path, ci.random_state_dict(0))
  return path


def _eval(capsys, *argv):
  from var_jax import cli
  rc = cli.main(["eval"] + [str(a) for a in argv] + ["--no-progress"])
  cap = capsys.readouterr()
  return rc, cap.out, cap.err.strip().splitlines()


@pytest.mark.slow  # Runs the (random) Inception.
def test_eval_with_one_sample_image_writes_no_cache(tmp_path, capsys,
                                                    weights):
  samples, ref = tmp_path / "s.npz", tmp_path / "r.npz"
  np.savez(samples, arr_0=_images(0, 1, 40, 40))
  np.savez(ref, arr_0=_images(1, 6, 40, 40))
  rc, out, err = _eval(capsys, samples, "--ref", ref, "--metrics", "fid",
                       "--inception", weights, "--batch", 4,
                       "--sample-cache", tmp_path / "sc.npz",
                       "--ref-cache", tmp_path / "rc.npz")
  assert rc == 2 and out == "" and len(err) == 1, err
  assert err[0].startswith("var-jax eval: error: FID needs at least 2 sample "
                           "images"), err
  assert sorted(os.listdir(tmp_path)) == ["r.npz", "s.npz"]


@pytest.mark.slow  # Two eval runs through the (random) Inception.
def test_eval_refuses_a_cache_of_replaced_samples(tmp_path, capsys, weights):
  samples = tmp_path / "s.npz"
  np.savez(samples, arr_0=_images(0, 4, 40, 40))
  args = [samples, "--metrics", "is", "--inception", weights, "--batch", 4,
          "--sample-cache", tmp_path / "sc.npz"]
  rc, out, err = _eval(capsys, *args)
  assert rc == 0, err
  first = json.loads(out)
  rc, out, err = _eval(capsys, *args)  # Unchanged: read from the cache.
  assert rc == 0 and json.loads(out)["seconds"]["sample_features"] == 0.0
  np.savez(samples, arr_0=_images(1, 4, 40, 40))  # Same name, new images.
  rc, out, err = _eval(capsys, *args)
  assert rc == 2 and out == "" and len(err) == 1, err
  assert "(image content differ)" in err[0]
  assert first["num_samples"] == 4


# ------------------------------------------------------------- token caches

def test_token_cache_of_another_tokenizer_is_refused():
  from var_jax.training.trainer import token_cache_differences
  model = types.SimpleNamespace(
      var=types.SimpleNamespace(patch_nums=(1, 2), num_classes=10),
      vae=types.SimpleNamespace(vocab_size=8))
  src = types.SimpleNamespace(patch_nums=(1, 2), vocab_size=8, num_classes=10,
                              tokens_NL=np.zeros((2, 5), np.int32),
                              tokenizer="aaaa")
  assert token_cache_differences(src, model, "aaaa") == []
  assert token_cache_differences(src, model, "bbbb") == [
      "tokenizer aaaa in the cache, bbbb in the model (the cache was made "
      "with other tokenizer weights; tokenize again with this run's "
      "tokenizer)"]
  src.tokenizer = None  # Written before caches stored it: not compared.
  assert token_cache_differences(src, model, "bbbb") == []


@pytest.mark.slow  # tokenize, then a training start with another tokenizer.
def test_train_refuses_tokens_of_another_tokenizer(tmp_path, capsys,
                                                   random_digits_vae_dir):
  from golden_models import SMALL_VAE, small_vae

  from var_jax import checkpoint, cli
  from var_jax.data.sources import TokenSource
  from var_jax.models.var.config import ModelConfig
  cache = tmp_path / "t.npz"
  assert cli.main(["tokenize", "--ckpt", str(random_digits_vae_dir), "--data",
                   "digits", "--split", "val", "--out", str(cache)]) == 0
  capsys.readouterr()
  src = TokenSource(cache)
  assert len(src.tokenizer) == 16
  source = json.loads(str(np.load(cache)["source"]))
  assert source == {"data": "digits", "split": "val", "count": 180,
                    "num_classes": 10}
  # The same layout, other weights, under the name the cache was made with.
  other = tmp_path / "vae"
  checkpoint.save_model(other, ModelConfig("digits_vae", SMALL_VAE),
                        vae=small_vae(seed=1))
  work = tmp_path / "w"
  rc = cli.main(["train", "--config", "train_tiny", "--vae-ckpt", str(other),
                 "--workdir", str(work), "--data", f"tokens:{cache}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  assert "in the cache, " in err[0] and "other tokenizer weights" in err[0]
  assert err[0].startswith(f"var-jax train: error: token cache tokens:{cache} "
                           "does not fit model")
  assert not work.exists()
  # With the tokenizer that wrote it, the run starts (not run here).
  from var_jax.training import run as run_lib
  from var_jax.training.config import TrainConfig, load_config
  from var_jax.training.trainer import VARTask
  import dataclasses
  cfg = dataclasses.replace(load_config("train_tiny", TrainConfig),
                            vae_ckpt=str(random_digits_vae_dir),
                            data=f"tokens:{cache}", eval_split=None)
  r = run_lib.Run(cfg, work, VARTask)
  r._close(None, quiet=False)
  assert not work.exists()
