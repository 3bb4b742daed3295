"""Kind 5: a full disk mid-write is one line, exit 1, nothing left behind.

Each test mounts a small tmpfs (root is available here and in CI) so the
real filesystem runs out of space; without permission to mount, the tests
skip and say so.
"""

import asyncio
import contextlib
import gc
import logging
import os
import re
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest

from var_jax import cli
from var_jax import io as var_io
from var_jax.errors import WriteError


@contextlib.contextmanager
def _tmpfs(path, size):
  path.mkdir(parents=True, exist_ok=True)
  try:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}",
                           "tmpfs", str(path)], capture_output=True,
                          text=True, timeout=30, check=False)
  except (OSError, subprocess.SubprocessError) as e:
    pytest.skip(f"cannot mount a {size} tmpfs to fill up ({e})")
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a {size} tmpfs to fill up (mount says: "
                f"{proc.stderr.strip() or proc.returncode}; needs root)")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], capture_output=True,
                   timeout=30, check=False)


@pytest.fixture
def tiny_fs(tmp_path):
  with _tmpfs(tmp_path / "fs", "1m") as fs:
    yield fs


def _fill(fs):
  """Leaves (almost) no free space on `fs`; returns the filler's name."""
  name = "filler.bin"
  fd = os.open(fs / name, os.O_WRONLY | os.O_CREAT)
  try:
    with contextlib.suppress(OSError):
      while True:
        os.write(fd, b"\0" * 4096)
  finally:
    os.close(fd)
  return name


def _cli(capsys, *argv):
  code = cli.main(["--no-compile-cache", *argv])
  out, err = capsys.readouterr()
  return code, out, err


def _assert_one_line(err, cmd, path):
  # Progress bars (tqdm, redrawn with \r) are not messages.
  lines = [ln for ln in err.replace("\r", "\n").splitlines()
           if ln.strip() and not re.search(r"\d+%\|", ln)]
  assert len(lines) == 1, err
  assert lines[0] == (f"var-jax {cmd}: error: no space left on device "
                      f"writing {path}"), lines[0]


# The tiny model stores 16.2 MB of VQVAE and 2.8 MB of VAR: 17 MB holds the
# first and runs out in the second (and the written VQVAE must go too); with
# 1 MB the first write fails, a subset of that path (slow suite only).
@pytest.mark.parametrize("size,part", [
    pytest.param("1m", "vae", marks=pytest.mark.slow), ("17m", "var")],
    ids=["nothing-fits", "vae-fits-var-does-not"])
def test_convert_out_on_a_full_disk(golden_dir, tmp_path, size, part):
  # A fresh process: Orbax's background threads print on their own, so only
  # the real stderr of a whole run shows whether tracebacks escape.
  with _tmpfs(tmp_path / "fs", size) as fs:
    out = fs / "model"
    proc = subprocess.run(
        [sys.executable, "-m", "var_jax.cli", "--no-compile-cache", "convert",
         "--vae", str(golden_dir / "vae_tiny.pth"), "--var",
         str(golden_dir / "var_tiny.pth"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    _assert_one_line(proc.stderr, "convert", out / part)
    assert os.listdir(fs) == []  # No model, no .model.tmp-* directory.


def test_convert_overwrite_on_a_full_disk_keeps_the_old_model(
    golden_dir, tmp_path, capsys):
  with _tmpfs(tmp_path / "fs", "2m") as fs:
    out = fs / "model"
    out.mkdir()
    (out / "config.json").write_text('{"name": "old"}')
    code, _, err = _cli(capsys, "convert", "--vae",
                        str(golden_dir / "vae_tiny.pth"), "--out", str(out),
                        "--overwrite")
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(
        f"no space left on device writing {out}/vae")
    assert sorted(os.listdir(fs)) == ["model"]
    assert (out / "config.json").read_text() == '{"name": "old"}'


@pytest.mark.slow  # WriteError on a full disk: convert covers it by default.
def test_download_pair_on_a_full_disk_leaves_no_half_pair(golden_dir,
                                                          tmp_path):
  # The tiny drafter directory takes 19.1 MB, the refiner 16.9 MB: 25 MB
  # holds the first and runs out in the second, which then takes the new
  # drafter with it.
  from var_jax.convert.var import download as dl
  g = golden_dir
  fetch = lambda *_: (g / "vae_tiny.pth", g / "var_tiny.pth",
                      g / "var_tiny_refiner.pth")
  with _tmpfs(tmp_path / "fs", "25m") as fs:
    with pytest.raises(WriteError) as e:
      dl.download_pair(fs / "pair", steps=6, presets=("tiny", None),
                       fetch=fetch, log=lambda _: None)
    assert str(e.value).startswith(
        f"no space left on device writing {fs / 'pair' / 'refiner'}")
    assert os.listdir(fs) == []


def test_encode_out_on_a_full_disk(random_digits_vae_dir, tiny_fs, tmp_path,
                                   capsys):
  imgs = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), np.uint8)
  np.save(tmp_path / "imgs.npy", imgs)
  filler = _fill(tiny_fs)
  out = tiny_fs / "tok.npz"
  code, _, err = _cli(capsys, "encode", "--ckpt", str(random_digits_vae_dir),
                      "--images", str(tmp_path / "imgs.npy"), "--out",
                      str(out), "--batch", "3")
  assert code == 1
  _assert_one_line(err, "encode", out)
  assert os.listdir(tiny_fs) == [filler]


@pytest.mark.slow  # WriteError on a full disk: encode covers it by default.
def test_tokenize_out_on_a_full_disk(random_digits_vae_dir, tiny_fs, tmp_path,
                                     capsys):
  from PIL import Image
  for k in range(2):
    (tmp_path / "imgs" / f"c{k}").mkdir(parents=True)
    Image.new("RGB", (64, 64), (k * 200, 0, 0)).save(
        tmp_path / "imgs" / f"c{k}" / "x.png")
  filler = _fill(tiny_fs)
  out = tiny_fs / "tok.npz"
  code, _, err = _cli(capsys, "tokenize", "--ckpt", str(random_digits_vae_dir),
                      "--data", f"folder:{tmp_path / 'imgs'}", "--out",
                      str(out), "--batch", "2")
  assert code == 1
  _assert_one_line(err, "tokenize", out)
  assert os.listdir(tiny_fs) == [filler]


def test_png_and_npz_writers_on_a_full_disk(tiny_fs):
  """What `sample --out`, `edit --out` and `--save-npz` write through."""
  filler = _fill(tiny_fs)
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  for write, name in ((lambda p: var_io.save_png(p, noise), "grid.png"),
                      (lambda p: var_io.save_npz(p, x=noise), "out.npz"),
                      (lambda p: var_io.write_text(p, "x" * 10000),
                       "config.json")):
    with pytest.raises(WriteError) as e:
      write(tiny_fs / name)
    assert str(e.value) == (f"no space left on device writing "
                            f"{tiny_fs / name}")
    assert e.value.exit_code == 1
  assert os.listdir(tiny_fs) == [filler]


def test_an_existing_output_survives_a_failed_rewrite(tiny_fs):
  target = tiny_fs / "grid.png"
  var_io.save_png(target, np.zeros((4, 4, 3), np.uint8))
  before = target.read_bytes()
  filler = _fill(tiny_fs)
  noise = np.random.default_rng(1).integers(0, 256, (128, 128, 3), np.uint8)
  with pytest.raises(WriteError, match="no space left on device"):
    var_io.save_png(target, noise)
  assert target.read_bytes() == before
  assert sorted(os.listdir(tiny_fs)) == sorted([filler, "grid.png"])


def test_orbax_errors_are_recognised():
  # Tensorstore's status text (as Orbax raises it) carries the errno.
  e = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0": Failed to write '
                 "8 bytes to file 4: No space left on device "
                 "[os_error_code='28']")
  err = var_io.os_error_of(e)
  assert err is not None and err.errno == 28
  assert var_io.os_error_of(ValueError("shape mismatch")) is None
  path = f"/nonexistent-{uuid.uuid4().hex}"
  with pytest.raises(WriteError, match=f"no space left on device writing "
                     f"{path}"):
    with var_io.orbax_writes(path):
      raise e
  with pytest.raises(ValueError, match="shape mismatch"):
    with var_io.orbax_writes(path):
      raise ValueError("shape mismatch")


def _orbax_record(msg, exc=None):
  return logging.LogRecord(
      "absl", logging.ERROR, "/site-packages/orbax/checkpoint/async.py", 1,
      msg, None, (type(exc), exc, None) if exc is not None else None)


def test_orbax_echoes_of_an_io_fault_are_dropped():
  # Orbax's finalize thread logs the fault with its traceback attached; the
  # message itself carries no errno.
  keep = var_io._DropOrbaxIoErrors().filter
  full = ValueError("RESOURCE_EXHAUSTED: [os_error_code='28']")
  finalize = ("[wait_until_finished] Save Finalize thread (save_finalize) "
              "failed.")
  assert not keep(_orbax_record(finalize, full))
  assert not keep(_orbax_record("write failed", OSError(28, "No space")))
  # Other faults, and other loggers' records, stay visible.
  assert keep(_orbax_record(finalize, ValueError("shape mismatch")))
  assert keep(_orbax_record("something else"))
  other = _orbax_record(finalize, full)
  other.pathname = "/site-packages/mylib/x.py"
  assert keep(other)


def _unretrieved(caplog, *excs):
  """The exceptions asyncio logs for futures that failed unawaited."""
  loop = asyncio.new_event_loop()
  try:
    with caplog.at_level(logging.ERROR, logger="asyncio"):
      caplog.clear()
      for exc in excs:
        fut = loop.create_future()
        fut.set_exception(exc)
        del fut  # Freed here: a future holds no cycle.
        gc.collect(0)  # A young collection, not the whole jax heap.
  finally:
    loop.close()
  return [str(r.exc_info[1]) for r in caplog.records if r.name == "asyncio"]


def test_unretrieved_futures_of_orbax_writes_are_not_logged(
    caplog, monkeypatch, tmp_path):
  # What CI once printed 36 times after the one-line error: tensorstore
  # writes Orbax no longer awaited, reported by asyncio when collected.
  store = ValueError("RESOURCE_EXHAUSTED: Error writing x in OCDBT database: "
                     "[os_error_code='28']")
  others = [ValueError("shape mismatch"), TimeoutError("upload timed out"),
            ConnectionResetError(104, "Connection reset by peer"),
            RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 1 GiB")]
  monkeypatch.setattr(var_io, "_ORBAX_SAVED", threading.Event())
  var_io._install_orbax_quieting()
  # Before any Orbax save nothing is dropped.
  assert len(_unretrieved(caplog, store, *others)) == 5
  with pytest.raises(WriteError):
    with var_io.orbax_writes(tmp_path / "x"):
      raise store
  assert _unretrieved(caplog, store, *others) == [str(e) for e in others]


def test_outputs_that_can_never_be_written_are_named(tmp_path):
  (tmp_path / "d.png").mkdir()
  with pytest.raises(WriteError, match=r"d.png is a directory; give a file"):
    var_io.save_png(tmp_path / "d.png", np.zeros((2, 2, 3), np.uint8))
  (tmp_path / "f").write_text("x")
  with pytest.raises(WriteError, match=r"a parent of .*f/x.png is a file"):
    var_io.save_png(tmp_path / "f" / "x.png", np.zeros((2, 2, 3), np.uint8))
  # The same caught before any work, for commands that check their --out.
  from var_jax.errors import UserError
  with pytest.raises(UserError, match="--out must end in .png"):
    var_io.check_output_file(tmp_path / "x.jpg", ".png")
  with pytest.raises(UserError, match="f is a file, not a directory"):
    var_io.check_output_file(tmp_path / "f" / "x.png", ".png")
  assert sorted(os.listdir(tmp_path)) == ["d.png", "f"]
