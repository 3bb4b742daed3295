"""Environment mistakes are one line (docs/guarantees.md#environment).

Cache variables: `~` is expanded, a relative `XDG_CACHE_HOME` is ignored (the
XDG spec). An absent `JAX_PLATFORMS` backend and an out-of-memory are one
line on stderr (subprocesses: slow).
"""

import os
import resource
import subprocess
import sys

import pytest

from var_jax import api, caches


def test_compile_cache_variable_expands_the_home(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv(caches.COMPILE_CACHE_ENV, "~/x")
  assert caches.compile_cache_dir() == str(tmp_path / "x")


def test_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.delenv(caches.COMPILE_CACHE_ENV, raising=False)
  for relative in ("cache", "~/cache", "./c"):
    monkeypatch.setenv("XDG_CACHE_HOME", relative)
    want = tmp_path / ".cache" / "var-jax"
    assert caches.cache_root() == str(want)
    assert caches.compile_cache_dir() == str(want / "jax")
    assert str(api.default_models_dir()) == str(want / "models")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "abs"))
  assert caches.cache_root() == str(tmp_path / "abs" / "var-jax")


def test_models_variable_expands_the_home(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv(api.MODELS_ENV, "~/models")
  assert str(api.default_models_dir()) == str(tmp_path / "models")


def _cli(args, env=None, limit_mb=None):
  """`var-jax ARGS` in a fresh process (address space capped at
  `limit_mb`); returns (exit status, stderr)."""
  code = "import sys; from var_jax import cli; sys.exit(cli.main(sys.argv[1:]))"

  def cap():
    if limit_mb:
      lim = limit_mb << 20
      resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
  p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                     text=True, env=dict(os.environ, **(env or {})),
                     preexec_fn=cap, timeout=300)
  return p.returncode, p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("platform,command,out", [
    ("tpu", "sample-many", "a.npz"), ("cuda", "sample-many", "a.npz"),
    ("cuda", "sample", "a.png")])
def test_an_absent_jax_platform_is_one_line(tmp_path, platform, command,
                                            out):
  code, err = _cli([command, "--out", str(tmp_path / out)],
                   {"JAX_PLATFORMS": platform})
  assert code == 2
  assert err.startswith(f"var-jax {command}: error: JAX_PLATFORMS="
                        f"{platform}: no such backend on this machine"
                        ), err[-2000:]
  assert err.count("\n") == 1 and "Traceback" not in err
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_an_absent_jax_platform_is_one_line_for_training(tmp_path):
  # Training may join a multi-process job first, which has to come before
  # the backends start: the line comes from its own first device query.
  code, err = _cli(["train", "--config", "train_tiny", "--steps", "1",
                    "--workdir", str(tmp_path / "w")], {"JAX_PLATFORMS": "tpu"})
  assert code == 2, err[-2000:]
  assert err.startswith("var-jax train: error: JAX_PLATFORMS=tpu: no such "
                        "backend on this machine"), err[-2000:]
  assert err.count("\n") == 1 and "Traceback" not in err
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_out_of_memory_is_one_line_naming_the_batch(tmp_path):
  code, err = _cli(["--no-compile-cache", "sample", "--labels", "1", "--num",
                    "20000", "--batch", "20000", "--out",
                    str(tmp_path / "a.png")], limit_mb=4096)
  assert code == 1, err[-2000:]
  lines = [l for l in err.splitlines() if not l.startswith("var-jax: note:")]
  assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
  assert lines[0].startswith("var-jax sample: error: out of memory with "
                             "--batch 20000")
  assert lines[0].endswith("try a smaller --batch")
  assert not (tmp_path / "a.png").exists()
