"""`var-jax sample|edit --drafter-ckpt DIR --draft-steps N` and `bench sample`
with a refiner, as a user runs them."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from var_jax import checkpoint, cli


@pytest.fixture(scope="module")
def dirs(golden_dir, tmp_path_factory):
  """(drafter dir, refiner dir, refiner dir with another tokenizer)."""
  root = tmp_path_factory.mktemp("code")
  for name, var in (("drafter", "var_tiny.pth"),
                    ("refiner", "var_tiny_refiner.pth")):
    assert cli.main(["convert", "--vae", str(golden_dir / "vae_tiny.pth"),
                     "--var", str(golden_dir / var),
                     "--out", str(root / name)]) == 0
  cfg, vae, var = checkpoint.load_model(root / "refiner")
  w = vae.quantize.embedding.embedding
  w[...] = w[...] * 1.5
  checkpoint.save_model(root / "other_vae", cfg, vae, var)
  return root / "drafter", root / "refiner", root / "other_vae"


@pytest.mark.slow  # Compiles a drafter/refiner program (minutes on 2 cores).
def test_sample_cli_code_matches_official(dirs, golden, tmp_path):
  g = golden("code_tiny_io")
  drafter, refiner, _ = dirs
  npz, png = tmp_path / "s.npz", tmp_path / "s.png"
  assert cli.main(["sample", "--ckpt", str(refiner), "--drafter-ckpt",
                   str(drafter), "--draft-steps", "6", "--labels", "3,7",
                   "--cfg", "4", "--top-k", "1", "--top-p", "0",
                   "--out", str(png), "--save-npz", str(npz)]) == 0
  out = np.load(npz)
  for si in range(10):
    np.testing.assert_array_equal(out[f"idx_{si}"],
                                  g[f"code_cfg4.0_N6_idx_{si}"])
  ref = g["code_cfg4.0_N6_img"].transpose(0, 2, 3, 1)
  assert np.abs(out["images"] - ref).max() <= 1e-3
  assert Image.open(png).size == (2 * 256 + 6, 256 + 4)


@pytest.mark.slow  # Compiles a drafter/refiner program (minutes on 2 cores).
def test_edit_cli_with_a_drafter_keeps_the_given_tokens(dirs, golden,
                                                        tmp_path):
  g = golden("var_tiny_io")
  drafter, refiner, _ = dirs
  src = tmp_path / "in.png"
  Image.fromarray(g["img_u8"][0].transpose(1, 2, 0)).save(src)
  npz = tmp_path / "e.npz"
  assert cli.main(["edit", "--ckpt", str(refiner), "--drafter-ckpt",
                   str(drafter), "--draft-steps", "6", "--image", str(src),
                   "--box", "0.1,0.1,0.8,0.8", "--top-k", "1", "--top-p",
                   "0", "--out", str(tmp_path / "e.png"),
                   "--save-npz", str(npz)]) == 0
  out = np.load(npz)
  mask = out["mask"]
  assert mask.shape == (16, 16) and 0 < mask.sum() < 256
  # Outside the box the last scale keeps the input image's own tokens.
  keep = mask.reshape(-1) > 0.5
  np.testing.assert_array_equal(out["idx_9"][0][keep], g["idx_9"][0][keep])
  assert not np.array_equal(out["idx_9"][0], g["idx_9"][0])


def test_drafter_with_another_tokenizer_is_one_line(dirs, tmp_path, capsys):
  drafter, _, other = dirs
  out = tmp_path / "o.png"
  rc = cli.main(["sample", "--ckpt", str(other), "--drafter-ckpt",
                 str(drafter), "--draft-steps", "4", "--out", str(out)])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert "tokenizers have different weights" in err
  assert not out.exists()


@pytest.mark.slow  # Compiles a drafter/refiner program (minutes on 2 cores).
def test_bench_sample_with_a_refiner_prints_one_json_line():
  out = subprocess.run(
      [sys.executable, "-m", "var_jax.cli", "bench", "sample", "--preset",
       "tiny", "--refiner-preset", "tiny", "--draft-steps", "6",
       "--cfg-until", "8", "--batch", "1", "--random-init", "--iters", "1",
       "--warmup", "0", "--no-matmul-peak"],
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1, out.stdout
  rec = json.loads(lines[0])
  assert (rec["refiner_preset"], rec["draft_steps"], rec["cfg_until"]) == (
      "tiny", 6, 8)
  assert rec["img_per_s"] > 0 and rec["transformer_tflop_per_img"] > 0
  assert rec["temp_bytes"] > 0 and rec["argument_bytes"] > 0


@pytest.mark.parametrize("argv,needle", [
    (["--draft-steps", "4"], "--refiner-preset and --draft-steps go together"),
    (["--refiner-preset", "tiny_saln512", "--draft-steps", "4"],
     "does not share the tokenizer"),
])
def test_bench_bad_pair_is_one_line(argv, needle, capsys):
  rc = cli.main(["bench", "sample", "--preset", "tiny", "--random-init",
                 "--no-matmul-peak"] + argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  assert needle in err[0]
