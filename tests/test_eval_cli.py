"""`var-jax eval` from the command line: results, caches and bad input.

The Inception here has random weights (the golden seed recipe), so the
figures mean nothing: what is tested is the plumbing (readers, sharded
extraction, caches, metric selection, output) and that bad input is one line
on stderr, exit 2, with nothing written.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_close_rel
from PIL import Image
from pth_writer import write_pth

from var_jax import cli
from var_jax.convert import inception as ci

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NUMBERS = ("inception_score", "fid", "sfid", "precision", "recall",
            "num_samples", "num_ref")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """The golden random Inception as a torch .pth."""
  path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
  write_pth(path, ci.random_state_dict(0))
  return path


def _images(seed, n, h=40, w=40):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), np.uint8)


def _eval(argv, capsys):
  rc = cli.main(["eval"] + [str(a) for a in argv] + ["--no-progress"])
  cap = capsys.readouterr()
  return rc, cap.out, cap.err


def _numbers(result):
  return {k: result.get(k) for k in _NUMBERS}


def _score_once(weights, tmp_path, capsys):
  """One scored run that writes its feature caches: (arguments, result)."""
  samples, ref = tmp_path / "s.npz", tmp_path / "r.npz"
  np.savez(samples, arr_0=_images(0, 5))
  np.savez(ref, arr_0=_images(1, 6))
  common = [samples, "--ref", ref, "--inception", weights, "--batch", 4,
            "--metrics", "is,pr"]
  rc, out, err = _eval(common + ["--sample-cache", tmp_path / "sc.npz",
                                 "--ref-cache", tmp_path / "rc.npz",
                                 "--out", tmp_path / "res.json"], capsys)
  assert rc == 0, err
  first = json.loads(out)
  assert out.count("\n") == 1
  assert set(first) >= {"inception_score", "precision", "recall"}
  assert "fid" not in first and "sfid" not in first
  assert (first["num_samples"], first["num_ref"]) == (5, 6)
  assert "Inception Score" in err and "Recall" in err
  assert json.loads((tmp_path / "res.json").read_text()) == first
  assert 1.0 <= first["inception_score"] <= 5.0
  assert 0.0 <= first["precision"] <= 1.0 and 0.0 <= first["recall"] <= 1.0
  return common, first


@pytest.mark.slow  # End to end: two whole eval runs.
def test_scores_twice_equal_and_cache_reuse(weights, tmp_path, capsys):
  common, first = _score_once(weights, tmp_path, capsys)
  rc, out, err = _eval(common + ["--sample-cache", tmp_path / "sc.npz",
                                 "--ref-cache", tmp_path / "rc.npz"], capsys)
  again = json.loads(out)
  assert rc == 0, err
  assert _numbers(again) == _numbers(first)
  assert again["seconds"]["sample_features"] == 0.0
  assert again["seconds"]["ref_features"] == 0.0


@pytest.mark.slow  # Also claimed by the sharded digits run below.
def test_scores_recomputed_without_caches_are_equal(weights, tmp_path,
                                                    capsys):
  common, first = _score_once(weights, tmp_path, capsys)
  rc, out, err = _eval(common, capsys)  # Recomputed: no caches.
  assert rc == 0, err
  assert _numbers(json.loads(out)) == _numbers(first)


@pytest.mark.slow  # End to end: three whole eval runs.
def test_folder_equals_npz_and_precomputed_reference(weights, tmp_path,
                                                    capsys):
  imgs = _images(2, 4, 24, 32)
  folder = tmp_path / "pngs"
  folder.mkdir()
  for i, im in enumerate(imgs):
    Image.fromarray(im).save(folder / f"{i:03d}.png")
  np.savez(tmp_path / "s.npz", arr_0=imgs)
  # A reference made of statistics only (as VIRTUAL_imagenet256 ships them,
  # without the images): FID/sFID need no reference images then.
  rng = np.random.default_rng(3)
  a, b = rng.standard_normal((2048, 2048)), rng.standard_normal((2023, 2023))
  np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=a @ a.T / 2048,
           mu_s=np.zeros(2023), sigma_s=b @ b.T / 2023)
  runs = []
  for src in (folder, tmp_path / "s.npz"):
    rc, out, err = _eval([src, "--ref", tmp_path / "ref.npz", "--inception",
                          weights, "--batch", 4, "--metrics", "is"], capsys)
    assert rc == 0, err
    runs.append(json.loads(out))
  assert runs[0]["inception_score"] == runs[1]["inception_score"]
  assert runs[0]["num_ref"] is None
  assert runs[0]["ref_precomputed"] == ["pool", "spatial"]


# ----------------------------------------------------------------- bad input


def _truncated(tmp_path):
  p = tmp_path / "s.npz"
  np.savez(p, arr_0=_images(0, 6))
  data = p.read_bytes()
  p.write_bytes(data[: len(data) // 2])
  return [p], "truncated"


def _no_arr0(tmp_path):
  p = tmp_path / "s.npz"
  np.savez(p, images=_images(0, 6))
  return [p], "has no arr_0"


def _mixed_folder(tmp_path):
  d = tmp_path / "imgs"
  d.mkdir()
  Image.fromarray(_images(0, 1, 32, 32)[0]).save(d / "a.png")
  Image.fromarray(_images(1, 1, 32, 48)[0]).save(d / "b.png")
  return [d], "different sizes"


def _float_images(tmp_path):
  p = tmp_path / "s.npz"
  np.savez(p, arr_0=_images(0, 6).astype(np.float32) / 255)
  return [p], "expected uint8"


def _ref_other_width(tmp_path):
  p, r = tmp_path / "s.npz", tmp_path / "ref.npz"
  np.savez(p, arr_0=_images(0, 6))
  np.savez(r, arr_0=_images(1, 6), mu=np.zeros(512), sigma=np.eye(512),
           mu_s=np.zeros(2023), sigma_s=np.eye(2023))
  return [p, "--ref", r], "width 2048"


def _good_samples(tmp_path):
  p = tmp_path / "s.npz"
  np.savez(p, arr_0=_images(0, 6))
  return p


def _zeros_sd():
  return {k: np.zeros(s, np.int64 if d == "int64" else np.float32)
          for k, s, d in ci.torch_keys()}


def _weights_missing_key(tmp_path):
  sd = _zeros_sd()
  del sd["Mixed_6b.branch7x7_2.bn.running_var"]
  write_pth(tmp_path / "w.pth", sd)
  return ([_good_samples(tmp_path), "--metrics", "is", "--inception",
           tmp_path / "w.pth"], "Mixed_6b.branch7x7_2.bn.running_var")


def _weights_misshaped_key(tmp_path):
  sd = _zeros_sd()
  sd["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  write_pth(tmp_path / "w.pth", sd)
  return ([_good_samples(tmp_path), "--metrics", "is", "--inception",
           tmp_path / "w.pth"], "Conv2d_1a_3x3.conv.weight (32,3,5,5)")


def _weights_missing_file(tmp_path):
  return ([_good_samples(tmp_path), "--metrics", "is", "--inception",
           tmp_path / "nope.pth"], ci.WEIGHTS_URL)


def _no_ref_for_fid(tmp_path):
  return [_good_samples(tmp_path), "--metrics", "fid"], "--ref is needed"


def _bad_metric(tmp_path):
  return [_good_samples(tmp_path), "--metrics", "fid,kid"], "unknown metric"


@pytest.mark.parametrize("make", [
    _truncated, _no_arr0, _mixed_folder, _float_images, _ref_other_width,
    # The same weights error as a misshaped key (both listed at once in
    # test_eval_inception), each case writing a 95 MB state dict.
    pytest.param(_weights_missing_key, marks=pytest.mark.slow),
    _weights_misshaped_key, _weights_missing_file,
    _no_ref_for_fid, _bad_metric])
def test_bad_input_is_one_line_exit_2_nothing_written(make, weights, tmp_path,
                                                      capsys):
  argv, fragment = make(tmp_path)
  if "--inception" not in argv:
    argv += ["--inception", weights]
  before = sorted(p.name for p in tmp_path.rglob("*"))
  outs = [tmp_path / "res.json", tmp_path / "sc.npz", tmp_path / "rc.npz"]
  rc, out, err = _eval(argv + ["--out", outs[0], "--sample-cache", outs[1],
                               "--ref-cache", outs[2]], capsys)
  assert rc == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("var-jax eval: error: "), err
  assert fragment in lines[0]
  assert out == ""
  assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ----------------------------------------------------------- end to end


def _digits_reference(path, n):
  from var_jax.data.digits_eval import rendered_digits
  imgs, _ = rendered_digits("val", 64)
  u8 = np.clip(np.round(imgs[:n] * 255), 0, 255).astype(np.uint8)
  np.savez(path, arr_0=u8)


@pytest.mark.slow
def test_digits_sample_many_then_eval_sharded_equals_single(weights, tmp_path,
                                                            capsys):
  samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
  assert cli.main(["sample-many", "--per-class", "2", "--classes", "0,1,2,3",
                   "--batch", "8", "--out", str(samples)]) == 0
  _digits_reference(ref, 8)
  capsys.readouterr()

  def caches(tag):
    return ["--sample-cache", tmp_path / f"{tag}_s.npz", "--ref-cache",
            tmp_path / f"{tag}_r.npz"]

  argv = [samples, "--ref", ref, "--inception", weights, "--batch", 8]
  rc, out, err = _eval(argv + caches("a"), capsys)
  assert rc == 0, err
  one = json.loads(out)
  assert one["num_samples"] == 8 and one["num_ref"] == 8
  for k in ("inception_score", "fid", "sfid", "precision", "recall"):
    assert np.isfinite(one[k]), k
  # Scored again from scratch: the same features, the same numbers.
  argv += ["--metrics", "is,pr"]
  rc, out, err = _eval(argv + caches("b"), capsys)
  assert rc == 0, err
  twice = json.loads(out)
  for k in ("inception_score", "precision", "recall"):
    assert twice[k] == one[k], k
  for part in ("s", "r"):
    a, b = np.load(tmp_path / f"a_{part}.npz"), np.load(tmp_path / f"b_{part}.npz")
    for k in ("pool", "spatial", "logits_unbiased"):
      np.testing.assert_array_equal(a[k], b[k])

  # Four forced CPU devices, the batch split along the mesh's data axis.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "var_jax.cli", "eval"]
      + [str(a) for a in argv + caches("c")] + ["--no-progress"],
      env=env, cwd=_ROOT, capture_output=True, text=True, timeout=1200,
      check=False)
  assert proc.returncode == 0, proc.stderr
  four = json.loads(proc.stdout)
  assert (four["precision"], four["recall"]) == (one["precision"],
                                                 one["recall"])
  assert abs(four["inception_score"] - one["inception_score"]) <= (
      1e-5 * one["inception_score"])
  for part in ("s", "r"):
    a, c = np.load(tmp_path / f"a_{part}.npz"), np.load(tmp_path / f"c_{part}.npz")
    for k in ("pool", "spatial", "logits_unbiased"):
      assert_close_rel(c[k], a[k], rel=1e-5, name=f"{part}/{k}")


def test_bench_eval_prints_one_json_line(capsys):
  rc = cli.main(["bench", "eval", "--random-init", "--batch", "2", "--size",
                 "16", "--iters", "1", "--warmup", "0"])
  out = capsys.readouterr().out.strip().splitlines()
  assert rc == 0 and len(out) == 1
  res = json.loads(out[0])
  assert res["bench"] == "eval" and res["batch"] == 2
  assert res["images_per_s"] > 0 and res["s_per_batch"] > 0
