"""The examples run as a reader would run them, and write what they say."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # End to end: the example script in a fresh process.
def test_quickstart_writes_the_grid_and_the_edit(tmp_path):
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
  proc = subprocess.run(
      [sys.executable, str(_ROOT / "examples" / "quickstart.py")],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("wrote grid.png (10 classes) and edited.png")
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "edited.png", "grid.png"]  # Nothing else, not even the cache.
  grid = np.asarray(Image.open(tmp_path / "grid.png"))
  edited = np.asarray(Image.open(tmp_path / "edited.png"))
  side = grid.shape[0]
  assert grid.shape == (side, 10 * side, 3) and grid.dtype == np.uint8
  assert edited.shape == (side, 2 * side, 3)
  # The edit starts from the sampled 3, shown on its left; digits, not blank.
  np.testing.assert_array_equal(edited[:, :side], grid[:, 3 * side:4 * side])
  assert grid.std() > 20 and edited[:, side:].std() > 20


def test_quickstart_refuses_a_bad_seed_in_one_line(capsys):
  spec = importlib.util.spec_from_file_location(
      "quickstart", _ROOT / "examples" / "quickstart.py")
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  with pytest.raises(SystemExit) as e:
    quickstart.main(["--seed", "-1"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1, err
  assert err.endswith("error: argument --seed: expected an integer in "
                      "[0, 2**32), got '-1'"), err
