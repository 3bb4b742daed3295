"""The persistent compilation cache: on for commands, off for `import var_jax`."""

import json
import os
import subprocess
import sys

import pytest

from var_jax import cli

# Counts the persistent-cache hits of one `var-jax` command in a fresh process.
_COUNT_HITS = r"""
import json, sys
import jax.monitoring
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name.endswith("/cache_hits") else None)
from var_jax.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "hits": len(hits)}))
"""


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(cli.COMPILE_CACHE_ENV, str(tmp_path / "c"))
  assert cli.compile_cache_dir() == str(tmp_path / "c")
  for off in ("0", "off", "False"):
    monkeypatch.setenv(cli.COMPILE_CACHE_ENV, off)
    assert cli.compile_cache_dir() is None
  monkeypatch.delenv(cli.COMPILE_CACHE_ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cli.compile_cache_dir() == str(tmp_path / "xdg" / "var-jax" / "jax")


def test_import_leaves_the_jax_cache_off():
  code = ("import jax, var_jax, var_jax.cli, var_jax.sampling.var.sampler; "
          "print(repr(jax.config.jax_compilation_cache_dir))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout.strip()
  assert out == "None"


@pytest.mark.slow
def test_second_sample_run_does_not_compile(tmp_path):
  env = dict(os.environ, **{cli.COMPILE_CACHE_ENV: str(tmp_path / "cache")})
  runs = []
  for i in range(2):
    args = ["sample", "--labels", "1,2", "--out", str(tmp_path / f"{i}.png")]
    res = subprocess.run([sys.executable, "-c", _COUNT_HITS, *args], env=env,
                         capture_output=True, text=True, check=True)
    runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
  assert [r["rc"] for r in runs] == [0, 0]
  assert runs[0]["hits"] == 0
  assert runs[1]["hits"] >= 1
  assert (tmp_path / "0.png").read_bytes() == (tmp_path / "1.png").read_bytes()
