"""Kind 6 (parts that do not belong together) for model directories, and
kind 2 (values outside their domain) for the convert/encode/verify flags.

A model directory's config.json must describe the stored trees: every
mismatch is found before anything is restored and named in one line.
"""

import json
import shutil

import numpy as np
import pytest

from var_jax import checkpoint, cli
from var_jax.convert.var.convert import convert_files
from var_jax.errors import CheckpointError


@pytest.fixture(scope="module")
def models(golden_dir, model_dir, tmp_path_factory):
  """Two converted tiny models: 256px scales (the session's `model_dir`) and
  the 512px shared-AdaLN one."""
  root = tmp_path_factory.mktemp("models")
  shutil.copytree(model_dir, root / "m256")
  convert_files(golden_dir / "vae_tiny.pth",
                golden_dir / "var_tiny_saln512.pth", root / "m512",
                log=lambda _: None)
  return root


def _copy(models, name, tmp_path):
  d = tmp_path / name
  shutil.copytree(models / name, d)
  return d


def _edit_config(d, **changes):
  cfg = json.loads((d / "config.json").read_text())
  for dotted, value in changes.items():
    part, field = dotted.split("__")
    cfg[part][field] = value
  (d / "config.json").write_text(json.dumps(cfg))


def _run(capsys, *argv):
  code = cli.main(["--no-compile-cache", *argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_config_depth_differs_from_the_stored_tree(models, tmp_path):
  d = _copy(models, "m256", tmp_path)
  _edit_config(d, var__depth=3)
  with pytest.raises(CheckpointError) as e:
    checkpoint.load_model(d)
  msg = str(e.value)
  assert "\n" not in msg
  assert f"{d / 'var'} does not match the VAR in config.json" in msg
  # The stacked blocks carry the depth as their leading axis.
  assert "stored (2," in msg and "config.json implies (3," in msg


def test_tree_of_another_model(models, tmp_path):
  d = _copy(models, "m256", tmp_path)
  shutil.rmtree(d / "var")
  shutil.copytree(models / "m512" / "var", d / "var")
  with pytest.raises(CheckpointError) as e:
    checkpoint.load_model(d)
  msg = str(e.value)
  # The 512px model has shared AdaLN and a longer position table.
  assert "does not match the VAR in config.json" in msg
  assert "pos_1LC stored (1, 2240, 128) but config.json implies (1, 680, 128)" \
      in msg
  assert "unexpected parameter(s)" in msg and "missing" in msg


def test_tokenizer_that_cannot_be_built(models, tmp_path):
  d = _copy(models, "m256", tmp_path)
  _edit_config(d, vae__ch=16)  # GroupNorm's 32 groups do not divide 16.
  with pytest.raises(CheckpointError, match="describes a VQVAE that cannot "
                     "be built: Number of groups"):
    checkpoint.load_model(d, need_var=False)


def test_tokenizer_width_differs(models, tmp_path, capsys):
  d = _copy(models, "m256", tmp_path)
  _edit_config(d, vae__ch=64)
  np.save(tmp_path / "x.npy", np.zeros((1, 256, 256, 3), np.uint8))
  code, _, err = _run(capsys, "encode", "--ckpt", str(d), "--images",
                      str(tmp_path / "x.npy"), "--out",
                      str(tmp_path / "t.npz"))
  assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
  assert "does not match the VQVAE in config.json" in err
  assert "shape(s) differ" in err
  assert not (tmp_path / "t.npz").exists()


@pytest.mark.parametrize("change,match", [
    (dict(var__vocab_size=512), "VAR vocab_size 512 vs VQVAE 256"),
    (dict(var__cvae=8), "VAR cvae 8 vs VQVAE z_channels 16"),
    (dict(var__patch_nums=[1, 2, 4, 8]),
     r"VAR patch_nums \(1, 2, 4, 8\) vs VQVAE v_patch_nums \(1, 2, 3,"),
])
def test_transformer_must_fit_the_tokenizer(models, tmp_path, change, match):
  d = _copy(models, "m256", tmp_path)
  _edit_config(d, **change)
  with pytest.raises(CheckpointError, match=match):
    checkpoint.load_config(d)


@pytest.mark.parametrize("text", ["[]", "{", '{"vae": {"depth": 2}}'])
def test_invalid_config_json(models, tmp_path, text):
  d = _copy(models, "m256", tmp_path)
  (d / "config.json").write_text(text)
  with pytest.raises(CheckpointError, match="config.json is invalid"):
    checkpoint.load_model(d)


def test_missing_trees(models, tmp_path):
  d = _copy(models, "m256", tmp_path)
  shutil.rmtree(d / "var")
  with pytest.raises(CheckpointError, match="holds a tokenizer only"):
    checkpoint.load_model(d)
  assert checkpoint.load_model(d, need_var=False)[2] is None
  shutil.rmtree(d / "vae")
  with pytest.raises(CheckpointError, match="no VQVAE weights"):
    checkpoint.load_model(d, need_var=False)


@pytest.mark.parametrize("argv,match", [
    (["encode", "--images", "{x}", "--out", "{t}/t.npz", "--batch", "0"],
     "--batch must be at least 1, got 0"),
    (["encode", "--images", "{x}", "--out", "{t}/t.npz", "--batch", "-3"],
     "--batch must be at least 1, got -3"),
    (["encode", "--images", "{x}", "--out", "{t}"],
     "--out must end in .npz"),
    (["encode", "--images", "{x}", "--out", "{t}/dir.npz"],
     "dir.npz is a directory; give a file name"),
    (["encode", "--images", "{x}", "--out", "{t}/x.npy/t.npz"],
     "x.npy is a file, not a directory"),
    (["encode", "--images", "{t}/empty.npy", "--out", "{t}/t.npz"],
     "holds no images"),
    (["verify", "--torch-repo", "{t}", "--vae", "{x}", "--batch", "0"],
     "--batch must be in 1..64, got 0"),
    (["verify", "--torch-repo", "{t}", "--vae", "{x}", "--seed", "-1"],
     "--seed must be >= 0, got -1"),
    (["convert", "--vae", "{x}", "--out", "{t}/m", "--preset", "nope"],
     "unknown preset 'nope'"),
    (["download", "--model", "d16", "--out", "{t}/m", "--pth-dir",
      "gs://bucket/p"], "--pth-dir must be a local directory"),
])
def test_flags_out_of_domain(tmp_path, capsys, argv, match):
  np.save(tmp_path / "x.npy", np.zeros((1, 64, 64, 3), np.uint8))
  np.save(tmp_path / "empty.npy", np.zeros((0, 64, 64, 3), np.uint8))
  (tmp_path / "dir.npz").mkdir()
  argv = [a.format(x=tmp_path / "x.npy", t=tmp_path) for a in argv]
  before = sorted(p.name for p in tmp_path.iterdir())
  code, _, err = _run(capsys, *argv)
  assert code == 2 and err.count("\n") == 1, err
  assert match in err
  assert sorted(p.name for p in tmp_path.iterdir()) == before
