"""SIGTERM acts as SIGINT for every command, and temporaries of our naming
that a killed run left behind are removed by the next write beside them
(docs/guarantees.md#nothing-is-lost-on-overwrite)."""

import os
import subprocess
import sys

import pytest

from var_jax import io, tempnames

# Runs `var-jax list` with `api.catalog` sending SIGNAL to this process: the
# command is in flight when the signal arrives.
_LIST_SIGNALLED = r"""
import os, signal, sys
signum = getattr(signal, "SIG" + sys.argv[1])
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
from var_jax import api, cli
def catalog():
  os.kill(os.getpid(), signum)
  return []
api.catalog = catalog
before = signal.getsignal(signal.SIGTERM)
rc = cli.main(["list"])
assert signal.getsignal(signal.SIGTERM) == before, "handler left installed"
sys.exit(rc)
"""


@pytest.mark.slow
@pytest.mark.parametrize("name,code", [("INT", 130), ("TERM", 143)])
def test_a_signal_during_a_command_is_one_line(name, code):
  p = subprocess.run([sys.executable, "-c", _LIST_SIGNALLED, name],
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == code, p.stderr[-2000:]
  assert p.stderr == f"var-jax list: interrupted by SIG{name}\n"


def _dead_pid() -> int:
  p = subprocess.Popen(["true"])
  p.wait()
  return p.pid


def test_stale_temporaries_of_a_dead_run_are_removed(tmp_path):
  dead, live = _dead_pid(), os.getppid()
  host = tempnames.host_tag()
  stale = [f".model.tmp-{host}-{dead}-abcd1234",
           f".a.png.tmp-{host}-{dead}-x_9",
           f".model.old-{host}-{dead}-0123456789"]
  kept = [f".model.tmp-{host}-{live}-abcd1234",  # A live writer's.
          f".model.tmp-ffffff-{dead}-abcd1234"   # Another host's.
          if host != "ffffff" else f".model.tmp-000000-{dead}-ab",
          ".model.tmp-notours", "other.txt"]
  for name in stale + kept:
    if "png" in name or name.endswith(".txt"):
      (tmp_path / name).write_bytes(b"x")
    else:
      (tmp_path / name).mkdir()
      (tmp_path / name / "f").write_bytes(b"x")
  (tmp_path / "model").mkdir()  # The old `.old-` copy's destination.
  with io.atomic_dir(tmp_path / "model", overwrite=True) as tmp:
    (tmp / "config.json").write_text("{}")
  assert (tmp_path / "model" / "config.json").is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      kept + ["model"])


def test_an_old_copy_is_kept_while_it_is_the_only_one(tmp_path):
  """Killed between moving the old directory aside and moving the new one
  in: the old copy is all there is, and stays."""
  old = tmp_path / f".model.old-{tempnames.host_tag()}-{_dead_pid()}-0123456789"
  old.mkdir()
  io.write_text(tmp_path / "other.json", "{}")
  assert old.exists()
  assert not (tmp_path / "model").exists()
