"""`sample-many` guarantees (docs/guarantees.md): parts are resumed only by
the same settings and the same model, one writer per `--out`, and a parts
directory without its meta.json is never adopted."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from var_jax import checkpoint, locks
from var_jax.cli import main
from var_jax.errors import UserError
from var_jax.sampling import many

_DIGITS = checkpoint.DEFAULT_MODEL


class _FakeSampler:
  """Images from the sample ids alone (a `Sampler`'s interface for
  `sample_many`); `fail_at` raises once that many chunks are drawn."""

  def __init__(self, shade=0.0, fail_at=None):
    self.shade, self.fail_at, self.calls = shade, fail_at, 0

  def check_labels(self, classes, allow_null=False):
    del allow_null
    return np.asarray(classes, np.int32)

  def device_put(self, sharding):
    del sharding

  def run_arrays(self, labels, key, ids):
    del key
    if self.fail_at is not None and self.calls == self.fail_at:
      raise KeyboardInterrupt
    self.calls += 1
    ids = np.asarray(ids)
    imgs = np.zeros((len(ids), 4, 4, 3), np.float32) + self.shade
    imgs[:, 0, 0, 0] = (ids % 200) / 255
    return None, imgs, np.asarray(labels)


def _meta(model="sha256:aaaa"):
  return {"ckpt": "m", "model": model, "seed": 0, "batch": 2}


def _run(out, sampler, meta, **kw):
  return many.sample_many(sampler, [1, 2], 3, 2, 0, out, meta, **kw)


def test_fingerprint_follows_the_model_directory_contents(tmp_path):
  d = tmp_path / "m"
  shutil.copytree(_DIGITS, d)
  fp = checkpoint.fingerprint(d)
  moved = tmp_path / "moved"
  d.rename(moved)
  assert checkpoint.fingerprint(moved) == fp  # Same contents, other name.
  shutil.copytree(_DIGITS, d)
  os.utime(d / "vae" / "_METADATA", (1, 1))  # A file of other time.
  assert checkpoint.fingerprint(d) != fp
  shutil.rmtree(d)
  shutil.copytree(moved, d, copy_function=shutil.copy2)
  assert checkpoint.fingerprint(d) == fp  # A faithful copy.
  cfg = json.loads((d / "config.json").read_text())
  cfg["name"] = "other"
  (d / "config.json").write_text(json.dumps(cfg))
  assert checkpoint.fingerprint(d) != fp


def test_resume_with_another_model_is_refused(tmp_path):
  out = tmp_path / "s.npz"
  with pytest.raises(KeyboardInterrupt):
    _run(out, _FakeSampler(fail_at=1), _meta())
  chunks = sorted(p.name for p in (tmp_path / "s.npz.parts").iterdir())
  assert chunks == ["chunk_000000.npz", "meta.json"]  # Lock file removed.
  with pytest.raises(UserError, match=r"another model: model changed"):
    _run(out, _FakeSampler(shade=0.5), _meta("sha256:bbbb"))
  with pytest.raises(UserError, match=r"another model"):
    many.check_resumable(out, many.job_meta(_meta("sha256:bbbb"), [1, 2], 3))
  # --overwrite draws every sample with the new model.
  assert _run(out, _FakeSampler(shade=0.5), _meta("sha256:bbbb"),
              overwrite=True) == 6
  with np.load(out) as z:
    assert (z["arr_0"][..., 1] == 128).all()
    assert json.loads(str(z["meta"]))["model"] == "sha256:bbbb"
  # A finished file of another model is refused as well.
  with pytest.raises(UserError, match=r"other settings \(model\)"):
    _run(out, _FakeSampler(), _meta())


def test_parts_without_meta_json_are_refused(tmp_path):
  out = tmp_path / "s.npz"
  parts = tmp_path / "s.npz.parts"
  parts.mkdir()
  np.savez(parts / "chunk_000000.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(UserError, match=r"no meta.json"):
    _run(out, _FakeSampler(), _meta())
  assert sorted(p.name for p in parts.iterdir()) == ["chunk_000000.npz"]
  assert not out.exists()
  assert _run(out, _FakeSampler(), _meta(), overwrite=True) == 6


# Holds `OUT.parts/var-jax.lock` (argv[1]) as a running sample-many does
# (flock, pid inside) until its stdin closes. No jax: a plain Python process.
_HOLD = r"""
import fcntl, os, sys
lock = sys.argv[1]
os.makedirs(os.path.dirname(lock), exist_ok=True)
fd = os.open(lock, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.getpid()}\n".encode())
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_writer_is_refused_naming_the_pid(tmp_path, capsys):
  out, parts = tmp_path / "s.npz", tmp_path / "s.npz.parts"
  assert locks.holder_pid(parts) is None
  assert not parts.exists()  # The check creates nothing.
  child = subprocess.Popen([sys.executable, "-c", _HOLD,
                            str(parts / locks.LOCK_NAME)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
  try:
    assert child.stdout.readline().strip() == "locked"
    assert locks.holder_pid(parts) == child.pid
    with pytest.raises(UserError, match=rf"another sample-many \(pid "
                       rf"{child.pid}\)"):
      _run(out, _FakeSampler(), _meta())
    assert main(["sample-many", "--per-class", "1", "--classes", "1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"var-jax sample-many: error: {out} is being written by "
                   f"another sample-many (pid {child.pid}); wait for it to "
                   "finish or stop it\n")
  finally:
    child.stdin.close()
    child.wait()
  assert locks.holder_pid(parts) is None  # Released when its holder ended.
  assert _run(out, _FakeSampler(), _meta()) == 6
  assert not (tmp_path / "s.npz.parts").exists()


# `var-jax sample-many ARGS` that prints "chunk" after writing its first
# chunk and waits there (for stdin, or a signal).
_PAUSED = r"""
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
from var_jax import cli
from var_jax.sampling import many
save = many.image_io.save_npz
def save_then_wait(path, **arrays):
  save(path, **arrays)
  if path.name.startswith("chunk_"):
    print("chunk", flush=True)
    sys.stdin.readline()
many.image_io.save_npz = save_then_wait
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_writers_then_a_replaced_model(tmp_path, capsys):
  """The issue's runs: a second sample-many on a running one's --out is
  refused naming its pid; the interrupted run's model directory replaced
  under the same name is refused on resume, in one line each."""
  model, out = tmp_path / "model", tmp_path / "s.npz"
  shutil.copytree(_DIGITS, model)
  args = ["sample-many", "--ckpt", str(model), "--classes", "1,2",
          "--per-class", "2", "--batch", "2", "--out", str(out)]
  a = subprocess.Popen([sys.executable, "-c", _PAUSED, *args],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  try:
    assert a.stdout.readline().strip() == "chunk", a.stderr.read()[-3000:]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"var-jax sample-many: error: {out} is being written by another "
        f"sample-many (pid {a.pid}); wait for it to finish or stop it\n")
    a.send_signal(signal.SIGINT)
    assert a.wait(timeout=120) == 130
  finally:
    if a.poll() is None:
      a.kill()
  assert "var-jax sample-many: interrupted by SIGINT" in a.stderr.read()
  time.sleep(1.1)  # Modification times of the new copy differ.
  shutil.rmtree(model)
  # Replaced under the same name (as `cp -r` does: new modification times).
  shutil.copytree(_DIGITS, model, copy_function=shutil.copy)
  assert main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"var-jax sample-many: error: {out}.parts holds an "
                        "interrupted run of another model: model changed")
  assert err.count("\n") == 1
  assert (tmp_path / "s.npz.parts" / "chunk_000000.npz").exists()
