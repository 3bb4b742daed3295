"""`convert` guarantees (docs/guarantees.md): `.safetensors` weights are read
wherever `.pth` files are; SIGTERM and stale temporaries leave nothing of
ours behind."""

import os
import subprocess
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


# `var-jax convert ARGS` that sends SIGNAL to itself once the VQVAE tree is
# written into the temporary directory (the VAR tree still to come).
_CONVERT_SIGNALLED = r"""
import os, signal, sys
signum = getattr(signal, "SIG" + sys.argv[1])
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
from var_jax import checkpoint, cli
save = checkpoint.save_tree
def save_then_signal(path, tree):
  save(path, tree)
  os.kill(os.getpid(), signum)
checkpoint.save_tree = save_then_signal
sys.exit(cli.main(sys.argv[2:]))
"""


def _convert_signalled(golden_dir, out, name, *extra):
  return subprocess.run(
      [sys.executable, "-c", _CONVERT_SIGNALLED, name, "convert", "--vae",
       str(golden_dir / "vae_tiny.pth"), "--var",
       str(golden_dir / "var_tiny.pth"), "--out", str(out), *extra],
      capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name,code", [("TERM", 143), ("INT", 130)])
def test_a_signal_during_convert_leaves_the_old_model_and_no_temporary(
    golden_dir, tmp_path, name, code):
  out = tmp_path / "model"
  out.mkdir()
  (out / "config.json").write_text("old")
  p = _convert_signalled(golden_dir, out, name, "--overwrite")
  assert p.returncode == code, p.stderr[-3000:]
  assert p.stderr.splitlines()[-1] == f"var-jax convert: interrupted by SIG{name}"
  assert sorted(os.listdir(tmp_path)) == ["model"]
  assert os.listdir(out) == ["config.json"]
  assert (out / "config.json").read_text() == "old"


@pytest.mark.slow
def test_a_killed_converts_temporary_is_removed_by_the_next_run(
    golden_dir, tmp_path, capsys):
  out = tmp_path / "model"
  p = _convert_signalled(golden_dir, out, "KILL")
  assert p.returncode == -9
  left = os.listdir(tmp_path)
  assert len(left) == 1 and left[0].startswith(".model.tmp-"), left
  assert main(["convert", "--vae", str(golden_dir / "vae_tiny.pth"),
               "--out", str(out)]) == 0
  assert sorted(os.listdir(tmp_path)) == ["model"]
