"""`convert` guarantees (docs/guarantees.md): `.safetensors` weights are read
wherever `.pth` files are; SIGTERM and stale temporaries leave nothing of
ours behind."""

import sys

import numpy as np
import pytest

from var_jax.cli import main
from var_jax.convert import weights
from var_jax.convert.pth import read_pth, flatten_tensors


def _to_safetensors(pth, out):
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v)
             for k, v in flatten_tensors(read_pth(pth)).items()}, str(out))
  return out


def test_safetensors_reads_as_the_pth(golden_dir, tmp_path):
  pth = golden_dir / "vae_tiny.pth"
  st = _to_safetensors(pth, tmp_path / "vae.safetensors")
  a, b = flatten_tensors(read_pth(pth)), weights.read_weights(st)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.mark.slow
def test_convert_takes_safetensors(golden_dir, tmp_path, capsys):
  st = _to_safetensors(golden_dir / "vae_tiny.pth",
                       tmp_path / "vae.safetensors")
  assert main(["convert", "--vae", str(st), "--out",
               str(tmp_path / "m")]) == 0
  assert "wrote VQVAE" in capsys.readouterr().out
  assert (tmp_path / "m" / "config.json").is_file()


def test_a_broken_safetensors_file_is_one_line(tmp_path, capsys):
  bad = tmp_path / "w.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
  assert main(["convert", "--vae", str(bad), "--out",
               str(tmp_path / "m")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("var-jax convert: error: ") and "\n" not in err
  assert str(bad) in err and "safetensors" in err
  assert not (tmp_path / "m").exists()


def test_without_the_package_the_error_says_how_to_install(
    golden_dir, tmp_path, monkeypatch, capsys):
  st = _to_safetensors(golden_dir / "vae_tiny.pth",
                       tmp_path / "vae.safetensors")
  for name in ("safetensors", "safetensors.numpy"):
    monkeypatch.setitem(sys.modules, name, None)
  assert main(["convert", "--vae", str(st), "--out",
               str(tmp_path / "m")]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "pip install safetensors" in err, err
