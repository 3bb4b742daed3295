"""`var-jax sample`, `edit`, `sample-many` and the sampler's invariances."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from golden_models import golden_vae, golden_var
from PIL import Image

from var_jax import cli
from var_jax.sampling import many
from var_jax.sampling.var.sampler import SampleOptions, Sampler, loops_for


def test_sample_cli_greedy_matches_official(model_dir, golden, tmp_path,
                                            capsys):
  g = golden("var_tiny_io")
  png, npz = tmp_path / "grid.png", tmp_path / "s.npz"
  assert cli.main(["sample", "--ckpt", str(model_dir), "--labels", "3,7",
                   "--cfg", "1.5", "--top-k", "1", "--top-p", "0",
                   "--out", str(png),
                   "--save-npz", str(npz)]) == 0
  # One call: a short job, which gets the fast-compiling scan loops (the
  # program the golden sampler tests compile for these options). The line
  # names every file, and the model by its folder: converted without a
  # preset, its config calls it "converted".
  line = capsys.readouterr().out.strip()
  assert "(compiled with the scan loops: quick to compile, for a short job)" \
      in line, line
  assert line.startswith(f"wrote 2 samples of tiny to {png} and {npz} in "), \
      line
  out = np.load(npz)
  for si in range(10):
    assert out[f"idx_{si}"].dtype == np.int32
    np.testing.assert_array_equal(out[f"idx_{si}"],
                                  g[f"greedy_cfg1.5_idx_{si}"])
  ref = g["greedy_cfg1.5_img"].transpose(0, 2, 3, 1)
  assert out["images"].dtype == np.float32
  assert np.abs(out["images"] - ref).max() <= 1e-3
  assert Image.open(png).size == (2 * 256 + 6, 256 + 4)


def test_edit_cli_matches_official_inpaint(model_dir, golden, tmp_path,
                                           capsys):
  g = golden("var_tiny_io")
  src = tmp_path / "in.png"
  Image.fromarray(g["img_u8"][0].transpose(1, 2, 0)).save(src)
  npz = tmp_path / "e.npz"
  assert cli.main(["edit", "--ckpt", str(model_dir), "--image", str(src),
                   "--box", "0.1,0.1,0.8,0.8", "--mode", "inpaint",
                   "--cfg", "3", "--top-k", "1", "--top-p", "0",
                   "--num", "2", "--out", str(tmp_path / "e.png"),
                   "--save-npz", str(npz)]) == 0
  # Two greedy variants are the same edit (and a batch of two is the
  # program the library's golden edit tests compile).
  out = np.load(npz)
  ref = g["edit_inpaint_img"][0].transpose(1, 2, 0)
  assert out["images"].shape == (2,) + ref.shape
  assert np.abs(out["images"] - ref).max() <= 1e-3
  assert Image.open(tmp_path / "e.png").size == (2 * 256, 256)
  # The null class is called what it is, and both files are named.
  line = capsys.readouterr().out.strip()
  assert line.startswith(f"wrote {tmp_path / 'e.png'} and {npz}: "), line
  assert "by tiny, unconditional," in line and "label 10" not in line, line


@pytest.mark.parametrize("calls,loops", [
    (1, ("scan", "scan")), (8, ("scan", "scan")),
    (9, ("python", "unrolled")), (800, ("python", "unrolled"))])
def test_short_jobs_get_the_scan_loops(calls, loops):
  # Compiling or loading the unrolled program costs more than a few calls
  # of the scan one saves.
  assert loops_for(calls) == loops


@pytest.mark.parametrize("argv,needle", [
    (["sample", "--labels", "3,x"], "comma-separated integers"),
    (["sample", "--labels", "11"], "class ids in [0, 10]"),
    (["edit", "--image", "missing.png", "--box", "0,0,0.5,0.5"],
     "no such image file"),
    (["edit", "--image", "IMG", "--box", "0.5,0,0.4,1"],
     "is fractions in [0, 1] of the image side and must satisfy"),
    (["sample-many", "--out", "x.txt"], "must end in .npz"),
    (["sample-many", "--classes", "1,foo", "--out", "x.npz"],
     "--classes must be comma-separated integers"),
    (["sample-many", "--classes", "11", "--out", "x.npz"],
     "--classes must be class ids in [0, 10]"),
])
def test_bad_flags_are_one_line_errors(model_dir, tmp_path, capsys, argv,
                                       needle):
  src = tmp_path / "img.png"
  Image.new("RGB", (300, 200)).save(src)
  argv = [str(src) if a == "IMG" else a for a in argv]
  rc = cli.main(argv[:1] + ["--ckpt", str(model_dir)] + argv[1:]
                + ([] if "--out" in argv else ["--out",
                                               str(tmp_path / "o.png")]))
  err = capsys.readouterr().err.strip()
  assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "o.png").exists()


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
  rc = cli.main(["sample", "--ckpt", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o.png")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and "not a var-jax model directory" in err


@pytest.mark.slow  # Several compiled samplers / subprocesses (minutes).
def test_stochastic_loops_splits_and_dtypes_agree(golden_dir):
  vae, var = golden_vae(golden_dir), golden_var(golden_dir)
  labels = [1, 4, 10]
  ref = Sampler(vae, var, SampleOptions())(labels, seed=5, allow_null=True)
  scan = Sampler(vae, var, SampleOptions(scale_loop="scan", layer_loop="scan"))(
      labels, seed=5, allow_null=True)
  split = Sampler(vae, var, SampleOptions())
  parts = [split(labels[:1], seed=5),
           split(labels[1:], seed=5, offset=1, allow_null=True)]
  for si in range(10):
    np.testing.assert_array_equal(scan.idx[si], ref.idx[si])
    np.testing.assert_array_equal(
        np.concatenate([p.idx[si] for p in parts]), ref.idx[si])
  other = split(labels, seed=6, allow_null=True)
  assert not np.array_equal(other.idx[-1], ref.idx[-1])
  # bfloat16 compute and Gumbel smoothing: valid images, float32 out.
  for opts in (SampleOptions(dtype="bfloat16"),
               SampleOptions(more_smooth=True, scale_loop="scan")):
    out = Sampler(vae, var, opts)(labels[:1], seed=5)
    img = np.asarray(out.images_BHWC)
    assert img.dtype == np.float32 and np.isfinite(img).all()
    assert 0 <= img.min() and img.max() <= 1
  # Random labels when none are given: deterministic per seed.
  a = split(None, batch=2, seed=3)
  np.testing.assert_array_equal(a.labels_B, split(None, batch=2,
                                                  seed=3).labels_B)


class _Interrupt(Exception):
  pass


class _StopAfter:
  """Wraps a sampler so the job dies after `n` chunks, like a Ctrl-C."""

  def __init__(self, sampler, n):
    self.s, self.n = sampler, n

  def __getattr__(self, name):
    return getattr(self.s, name)

  def __setattr__(self, name, value):
    if name in ("s", "n"):
      object.__setattr__(self, name, value)
    else:
      setattr(self.s, name, value)

  def run_arrays(self, *a):
    if self.n == 0:
      raise _Interrupt
    self.n -= 1
    return self.s.run_arrays(*a)


@pytest.mark.slow  # Interrupted and resumed sample-many (subprocesses).
def test_sample_many_resumes_and_is_batch_invariant(golden_dir, tmp_path):
  vae, var = golden_vae(golden_dir), golden_var(golden_dir)
  meta = {"test": 1}
  full = tmp_path / "full.npz"
  classes = [0, 3, 10]
  n = many.sample_many(Sampler(vae, var), classes, 2, 4, 0, full, meta,
                       allow_null=True)
  assert n == 6
  ref = np.load(full)["arr_0"]
  assert ref.shape == (6, 256, 256, 3) and ref.dtype == np.uint8
  assert not (tmp_path / "full.npz.parts").exists()
  # Run again, the finished file is found: no sampler call, nothing written.
  stamp = full.stat().st_mtime_ns
  assert many.sample_many(_StopAfter(Sampler(vae, var), 0), classes, 2, 4, 0,
                          full, meta, allow_null=True) == 6
  with pytest.raises(cli.UserError, match="exists with other settings"):
    many.sample_many(_StopAfter(Sampler(vae, var), 0), classes, 2, 4, 0,
                     full, {"test": 2}, allow_null=True)
  assert full.stat().st_mtime_ns == stamp

  out = tmp_path / "resumed.npz"
  with pytest.raises(_Interrupt):
    many.sample_many(_StopAfter(Sampler(vae, var), 1), classes, 2, 4, 0, out,
                     meta, allow_null=True)
  assert len(list((tmp_path / "resumed.npz.parts").glob("chunk_*"))) == 1
  assert not out.exists()
  with pytest.raises(cli.UserError, match="other settings"):
    many.sample_many(Sampler(vae, var), classes, 2, 4, 1, out, {"test": 2},
                     allow_null=True)
  many.sample_many(Sampler(vae, var), classes, 2, 4, 0, out, meta,
                   allow_null=True)
  np.testing.assert_array_equal(np.load(out)["arr_0"], ref)


@pytest.mark.slow  # Several compiled samplers / subprocesses (minutes).
def test_sample_many_on_four_devices_matches(model_dir, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  outs = []
  for n_dev, batch in ((1, 3), (4, 4)):  # 5 samples: 2 chunks either way
    out = tmp_path / f"d{n_dev}.npz"
    e = env if n_dev == 4 else dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-m", "var_jax.cli", "sample-many", "--ckpt",
         str(model_dir), "--per-class", "1", "--classes", "0,2,4,6,8",
         "--batch", str(batch),
         "--out", str(out)], env=e, capture_output=True, text=True,
        timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    outs.append(np.load(out)["arr_0"])
  assert outs[0].shape == (5, 256, 256, 3)
  # Same tokens; the decoder's convolutions round differently per shape, so
  # a few pixels may land one level apart (a changed token moves many).
  diff = np.abs(outs[0].astype(int) - outs[1].astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


# ------------------------------------------- how many samples, which classes
@pytest.mark.parametrize("labels,num,per_class,n_cls,want", [
    ("7", 16, None, 10, [7] * 16),  # --num cycles over the given labels.
    ("3,7", 5, None, 10, [3, 7, 3, 7, 3]),
    ("3,7", None, 2, 10, [3, 3, 7, 7]),  # --per-class: P of each label.
    ("3,7", None, None, 10, [3, 7]),  # One of each.
    # Without labels --num spreads N over the classes, sorted, every class
    # within one of the others' count.
    (None, 16, None, 10, [0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 6, 7, 8, 8, 9]),
    (None, 5, None, 10, [0, 2, 4, 6, 8]),
    (None, None, 2, 3, [0, 0, 1, 1, 2, 2]),
    (None, None, None, 3, [c for c in range(3) for _ in range(8)]),
])
def test_num_and_per_class_mean_what_they_say(labels, num, per_class, n_cls,
                                              want):
  from var_jax.sampling import jobs
  got, ncol = jobs.sample_labels(labels, num, per_class, n_cls, seed=0)
  assert got == want
  assert ncol == (per_class if per_class else
                  8 if (labels, num) == (None, None) else None)


def test_large_label_sets_draw_num_random_classes_or_per_class_of_all():
  from var_jax.sampling import jobs
  got, _ = jobs.sample_labels(None, 12, None, 1000, seed=0)
  assert len(got) == 12 and all(0 <= c < 1000 for c in got)
  assert got == jobs.sample_labels(None, 12, None, 1000, seed=0)[0]
  assert len(jobs.sample_labels(None, None, None, 1000, seed=0)[0]) == 8
  assert jobs.sample_labels(None, None, 1, 1000, seed=0)[0] == list(
      range(1000))


def test_num_with_per_class_is_refused_before_loading(tmp_path, capsys):
  rc = cli.main(["sample", "--ckpt", str(tmp_path / "no_model"), "--num",
                 "4", "--per-class", "2", "--out", str(tmp_path / "o.png")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert "--num N (N samples in all) and --per-class P" in err
  assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # End to end: two bundled-model runs (the flag logic: above).
def test_num_counts_samples_and_out_names_the_format(tmp_path, capsys):
  """`--labels 7 --num 16` is 16 sevens, the .jpg a JPEG, and --out-dir one
  PNG per sample named by index, label and seed; the line names them all."""
  grid, npz, each = tmp_path / "g.jpg", tmp_path / "s.npz", tmp_path / "each"
  assert cli.main(["sample", "--labels", "7", "--num", "16", "--batch", "16",
                   "--seed", "3", "--out", str(grid), "--save-npz", str(npz),
                   "--out-dir", str(each)]) == 0
  line = capsys.readouterr().out.strip()
  assert line.startswith(f"wrote 16 samples of digits to {grid}, {npz} and "
                         f"{each}/ (16 PNG files, 00000_label7_seed3.png "
                         "... 00015_label7_seed3.png) in "), line
  out = np.load(npz)
  np.testing.assert_array_equal(out["labels"], [7] * 16)
  assert out["images"].shape == (16, 64, 64, 3)
  with Image.open(grid) as im:
    assert im.format == "JPEG" and im.size == (8 * 66 + 2, 2 * 66 + 2)
  names = sorted(p.name for p in each.iterdir())
  assert names == [f"{i:05d}_label7_seed3.png" for i in range(16)]
  with Image.open(each / names[5]) as im:
    assert im.format == "PNG"
    np.testing.assert_array_equal(
        np.asarray(im), np.clip(out["images"][5] * 255 + 0.5, 0, 255
                                ).astype(np.uint8))

  # Without labels: 16 images over the 10 classes; --out-dir alone writes
  # no grid.
  only = tmp_path / "only"
  assert cli.main(["sample", "--num", "16", "--batch", "16", "--out-dir",
                   str(only)]) == 0
  names = sorted(p.name for p in only.iterdir())
  assert len(names) == 16
  assert {int(n.split("_label")[1].split("_")[0]) for n in names} == set(
      range(10))
  assert not (tmp_path / "samples.png").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "each", "g.jpg", "only", "s.npz"]


@pytest.mark.slow  # End to end: three bundled-model runs (the refusals:
# test_guarantees_sample_many).
def test_sample_many_leaves_a_finished_run_alone(tmp_path, capsys):
  out = tmp_path / "m.npz"
  argv = ["sample-many", "--per-class", "1", "--classes", "1,2",
          "--batch", "2", "--out", str(out)]
  assert cli.main(argv) == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line == f"wrote 2 samples of digits to {out} (arr_0, uint8)"
  first, stamp = out.read_bytes(), out.stat().st_mtime_ns

  # The same job (another batch size changes no sample): reported, untouched.
  assert cli.main(argv[:-4] + ["--batch", "1", "--out", str(out)]) == 0
  captured = capsys.readouterr()
  assert captured.out.strip() == (
      f"{out} is complete: 2 samples with these settings; nothing to do "
      "(--overwrite draws them again)")
  assert out.stat().st_mtime_ns == stamp and out.read_bytes() == first

  # Other settings: one line naming them, nothing written.
  assert cli.main(argv + ["--seed", "1"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == (f"var-jax sample-many: error: {out} exists with other "
                 "settings (seed); --overwrite replaces it")
  assert out.stat().st_mtime_ns == stamp
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]

  # --overwrite draws them again.
  assert cli.main(argv + ["--seed", "1", "--overwrite"]) == 0
  assert "wrote 2 samples" in capsys.readouterr().out
  again = np.load(out)
  assert again["arr_0"].shape == (2, 64, 64, 3)
  assert not np.array_equal(again["arr_0"], np.load(io.BytesIO(first))[
      "arr_0"])


def test_sample_many_refuses_an_npz_it_did_not_write(tmp_path, capsys):
  out = tmp_path / "other.npz"
  np.savez(out, arr_0=np.zeros((2, 64, 64, 3), np.uint8))
  before = out.read_bytes()
  rc = cli.main(["sample-many", "--per-class", "1", "--classes", "1,2",
                 "--batch", "2", "--out", str(out)])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert "was not written by sample-many" in err and "--overwrite" in err
  assert out.read_bytes() == before
