"""`var-jax sample --fast`: collaborative decoding with the bundled digits
pair (the digits VAR drafts, the shipped half-depth refiner draws the rest)."""

import numpy as np
import pytest

from var_jax import checkpoint, cli
from var_jax.sampling import commands
from var_jax.sampling.var.sampler import SampleOptions, Sampler

REFINER = checkpoint.DEFAULT_MODEL.with_name("digits_refiner")


def _refiner():
  return checkpoint.load_var(REFINER)


def test_shipped_refiner_is_small_and_shares_the_tokenizer():
  size = sum(f.stat().st_size for f in REFINER.rglob("*") if f.is_file())
  assert size < 3e6, size  # A few MB: the transformer only, float16.
  assert not (REFINER / "vae").exists()
  ref, big = checkpoint.load_config(REFINER), checkpoint.load_config(
      checkpoint.DEFAULT_MODEL)
  assert ref.vae == big.vae
  assert ref.var.depth < big.var.depth
  assert ref.var.patch_nums == big.var.patch_nums


@pytest.mark.slow  # End to end: sample --fast in a fresh process.
def test_sample_fast_draws_with_the_bundled_pair(tmp_path):
  npz, png = tmp_path / "f.npz", tmp_path / "f.png"
  labels = [0, 3, 7]
  assert cli.main(["sample", "--fast", "--labels", "0,3,7", "--batch", "3",
                   "--out", str(png), "--save-npz", str(npz)]) == 0
  out = np.load(npz)
  assert png.stat().st_size > 0
  assert out["images"].shape == (3, 64, 64, 3)
  _, vae, digits = checkpoint.load_model(None)
  n = commands.FAST_DRAFT_STEPS
  # A one-call job: the CLI samples with the scan loops.
  pair = Sampler(vae, _refiner(), SampleOptions(draft_steps=n,
                                                scale_loop="scan",
                                                layer_loop="scan"),
                 drafter=digits)(labels, seed=0)
  plain = Sampler(vae, digits, SampleOptions())(labels, seed=0)
  for si, ids in enumerate(pair.idx):
    # Every scale is the pair's; the drafter's scales equal a plain run.
    np.testing.assert_array_equal(out[f"idx_{si}"], np.asarray(ids))
    if si < n:
      np.testing.assert_array_equal(out[f"idx_{si}"],
                                    np.asarray(plain.idx[si]))
  np.testing.assert_allclose(out["images"], np.asarray(pair.images_BHWC),
                             atol=1e-6)


def test_fast_refuses_another_model(tmp_path, capsys):
  rc = cli.main(["sample", "--fast", "--ckpt", str(checkpoint.DEFAULT_MODEL),
                 "--out", str(tmp_path / "x.png")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and "--fast" in err, err
  assert not (tmp_path / "x.png").exists()


@pytest.mark.slow  # End to end: two collaborative sampling runs.
def test_the_bundled_pair_by_name_is_what_fast_draws(tmp_path, capsys):
  # --ckpt and --drafter-ckpt take the bundled models' names; the refiner
  # comes with the digits tokenizer.
  fast, named = tmp_path / "fast.npz", tmp_path / "named.npz"
  common = ["--labels", "1,4", "--batch", "2", "--seed", "5"]
  assert cli.main(["sample", "--fast", *common, "--out",
                   str(tmp_path / "a.png"), "--save-npz", str(fast)]) == 0
  assert cli.main(["sample", "--ckpt", "digits_refiner", "--drafter-ckpt",
                   "digits", "--draft-steps", str(commands.FAST_DRAFT_STEPS),
                   *common, "--out", str(tmp_path / "b.png"),
                   "--save-npz", str(named)]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  want = (f"wrote 2 samples of digits + digits_refiner (CoDe, "
          f"{commands.FAST_DRAFT_STEPS} draft scales) to ")
  assert len(lines) == 2 and all(x.startswith(want) for x in lines), lines
  a, b = np.load(fast), np.load(named)
  assert a.files == b.files
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
