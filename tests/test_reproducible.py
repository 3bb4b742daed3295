"""The default sampling path on one machine gives the same bytes every run.

docs/guarantees.md#reproducibility: with no stored CPU tuning plan, `var-jax
sample` writes the same PNG whether its programs were compiled in this run
(two runs, each with an empty compilation cache) or loaded from the cache
the first run filled.
"""

import json
import os
import subprocess
import sys

import pytest

# One `var-jax` command in a fresh process; prints its exit status and how
# many programs it loaded from the persistent compilation cache.
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


@pytest.mark.slow  # Three processes, two of them compiling (about a minute).
def test_sample_is_the_same_bytes_cold_twice_and_warm(tmp_path):
  xdg = tmp_path / "xdg"  # An empty cache home: no stored tuning plan.
  runs = []
  for name, cache in (("cold1", "cache_a"), ("cold2", "cache_b"),
                      ("warm", "cache_a")):
    env = dict(os.environ, XDG_CACHE_HOME=str(xdg),
               VAR_JAX_COMPILE_CACHE=str(tmp_path / cache))
    proc = subprocess.run(
        [sys.executable, "-c", _COUNT_HITS, "sample", "--labels", "1,2",
         "--out", str(tmp_path / f"{name}.png")], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert [r["rc"] for r in runs] == [0, 0, 0]
  # Both cold runs compiled everything; the warm run loaded from the cache.
  assert runs[0]["hits"] == 0 and runs[1]["hits"] == 0
  assert runs[2]["hits"] >= 1
  assert not list(xdg.rglob("cpu_plans.json"))  # Nothing tuned or stored.
  first = (tmp_path / "cold1.png").read_bytes()
  assert (tmp_path / "cold2.png").read_bytes() == first
  assert (tmp_path / "warm.png").read_bytes() == first
