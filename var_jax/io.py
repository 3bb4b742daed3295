"""The one place var-jax writes user-visible files.

Every output (PNG, npz, model directories, config files, token caches) is
written under a temporary name beside its destination and renamed into place,
so a crash or a full disk never leaves a half-written file under the final
name. Paths are `etils.epath.Path`s: local paths and `gs://...` (or any other
scheme epath's backends know) work alike; a `scheme://` path is never taken
for a local directory.

Errors: an `OSError` while writing becomes `var_jax.errors.WriteError` naming
the path and the cause ("no space left on device"), after the temporary file
or directory is removed.

Temporaries are named and swept as `var_jax.tempnames` says.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
from etils import epath

from var_jax.errors import CheckpointError, WriteError
from var_jax.tempnames import sweep_stale, temp_prefix


# Remote schemes: the fsspec package epath needs and how to install it
# (var-jax is not on PyPI: an extra is installed from a checkout).
_REMOTE = {"gs": ("gcsfs",
                  "pip install gcsfs (from a checkout: pip install '.[gcs]')"),
           "s3": ("s3fs", "pip install s3fs")}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def _tf_serves_remote() -> bool:
  """True when epath would use TensorFlow's file system instead of fsspec."""
  return (os.environ.get("EPATH_USE_TF", "").lower()
          not in ("false", "no", "f", "0")
          and importlib.util.find_spec("tensorflow") is not None)


def check_scheme(path) -> None:
  """Refuses a `scheme://` path that epath cannot open here, as one line.

  Raises:
    UserError: an unknown scheme, or gs:// / s3:// without its backend
      package (gcsfs / s3fs).
  """
  from var_jax.errors import UserError
  text = os.fspath(path)
  if is_local(text):
    return
  m = _SCHEME.match(text)
  scheme = m.group(1).lower() if m else None
  if scheme not in _REMOTE:
    shown = f"{scheme}://" if scheme else "this kind of path"
    raise UserError(f"{text}: unsupported scheme {shown} (supported: local "
                    "paths, gs://, s3://)")
  package, hint = _REMOTE[scheme]
  if (importlib.util.find_spec(package) is None
      and not _tf_serves_remote()):
    raise UserError(f"{text}: {scheme}:// paths need {package}: {hint}")


def as_path(path) -> epath.Path:
  """A user-given path (str, pathlib or epath) as an `epath.Path`.

  `~` is expanded for local paths; `gs://bucket/x` stays a cloud path.

  Raises:
    UserError: a `scheme://` path this installation cannot open (unknown
      scheme, or no gcsfs / s3fs), before anything touches it.
  """
  check_scheme(path)
  p = path if isinstance(path, epath.Path) else epath.Path(os.fspath(path))
  return p.expanduser() if is_local(p) else p


def is_local(path) -> bool:
  """True for a path on the local filesystem (no `scheme://` prefix)."""
  return "://" not in os.fspath(path)


def _umask_mode(full: int) -> int:
  """`full` (0o666 files, 0o777 directories) less the process umask."""
  mask = os.umask(0)
  os.umask(mask)
  return full & ~mask


def describe_os_error(e: OSError, path, doing: str = "writing") -> str:
  """One line: "<cause> <doing> <path>", e.g. no space left on device."""
  if e.errno == errno.EISDIR:
    return f"{path} is a directory; give a file name"
  if e.errno == errno.ENOTDIR:
    return f"a parent of {path} is a file, not a directory"
  if e.errno == errno.ENOSPC:
    cause = "no space left on device"
  elif e.errno == errno.EDQUOT:
    cause = "disk quota exceeded"
  elif e.errno in (errno.EACCES, errno.EPERM):
    cause = "permission denied"
  elif e.errno == errno.EROFS:
    cause = "read-only file system"
  else:
    cause = (e.strerror or str(e) or type(e).__name__).lower()
  return f"{cause} {doing} {path}"


# Tensorstore (under Orbax) reports the errno inside a status message.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_STATUS_ERRNO = (("No space left on device", errno.ENOSPC),
                 ("RESOURCE_EXHAUSTED", errno.ENOSPC),
                 ("PERMISSION_DENIED", errno.EACCES),
                 ("Read-only file system", errno.EROFS))


def os_error_of(e: BaseException) -> OSError | None:
  """The operating-system error behind `e`, or None if there is none.

  `e` itself or one of its causes when one is an `OSError`; else an
  `OSError` rebuilt from the errno a tensorstore status message carries
  (Orbax raises those as `ValueError`s).
  """
  seen = 0
  while e is not None and seen < 8:
    if isinstance(e, OSError):
      return e
    text = str(e)
    m = _OS_ERROR_CODE.search(text)
    if m:
      code = int(m.group(1))
      return OSError(code, os.strerror(code))
    for needle, code in _STATUS_ERRNO:
      if needle in text:
        return OSError(code, os.strerror(code))
    e, seen = e.__cause__ or e.__context__, seen + 1
  return None


def _unique_sibling(path: epath.Path, tag: str) -> epath.Path:
  return path.parent / (temp_prefix(path.name, tag) + uuid.uuid4().hex[:10])


def _make_parent(path: epath.Path) -> None:
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
  except FileExistsError:  # mkdir met a file where a directory must be.
    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None


def atomic_file(path, write) -> epath.Path:
  """Calls `write(binary file object)` on a temporary name, then renames.

  Args:
    path: destination (local or `gs://`); its parent is created.
    write: callable taking an open binary file.

  Returns:
    The destination as an `epath.Path`.

  Raises:
    WriteError: the write or rename failed (full disk, permissions); the
      temporary file is removed and an existing `path` is untouched.
  """
  path = as_path(path)
  try:
    _make_parent(path)
    if is_local(path):
      sweep_stale(path.parent)
      fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name, "tmp"),
                                 dir=os.fspath(path.parent))
      try:
        with os.fdopen(fd, "wb") as fh:
          write(fh)
          fh.flush()
          os.fsync(fh.fileno())
        # mkstemp creates 0600; give what open(path, "wb") would.
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, os.fspath(path))
      finally:
        if os.path.exists(tmp):
          os.unlink(tmp)
    else:
      tmp = _unique_sibling(path, "tmp")
      try:
        with tmp.open("wb") as fh:
          write(fh)
        tmp.replace(path)
      finally:
        if tmp.exists():
          tmp.unlink()
  except OSError as e:
    raise WriteError(describe_os_error(e, path)) from None
  return path


def check_output_file(path, suffix: str | None = None, flag: str = "--out"):
  """Refuses an output file path that can never be written, before any work.

  Args:
    path: the output file (local or `gs://`).
    suffix: required ending (e.g. ".npz"), or None.
    flag: the flag name used in messages.

  Returns:
    The path as an `epath.Path`.

  Raises:
    UserError: wrong suffix, an existing directory, or a parent that is a
      file.
  """
  from var_jax.errors import UserError
  p = as_path(path)
  if suffix is not None and not os.fspath(p).endswith(suffix):
    raise UserError(f"{flag} must end in {suffix}, got {path}")
  with reachable(p, flag):
    if p.is_dir():
      raise UserError(f"{flag} {path} is a directory; give a file name")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
      parent = parent.parent
    if parent.exists() and not parent.is_dir():
      raise UserError(f"{flag} {path}: {parent} is a file, not a directory")
  return p


@contextlib.contextmanager
def reachable(path, flag: str = "path"):
  """Turns a failure to reach remote storage into one `UserError`.

  Cloud backends (gcsfs over aiohttp, google-auth) raise their own zoo of
  exception types for a missing network, missing credentials or an unknown
  bucket; for a `scheme://` path any such failure becomes one line naming
  the path and the cause. Local paths pass their errors through unchanged.
  """
  from var_jax.errors import UserError, VarJaxError
  try:
    yield
  except VarJaxError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if is_local(path):
      raise
    cause = " ".join(str(e).split()) or type(e).__name__
    raise UserError(f"{flag} {path}: cannot reach the storage "
                    f"({type(e).__name__}: {cause[:300]}); check the network "
                    "and credentials (e.g. gcloud auth application-default "
                    "login)") from None


def write_text(path, text: str) -> epath.Path:
  """Writes a text file (UTF-8) atomically."""
  data = text.encode("utf-8")
  return atomic_file(path, lambda fh: fh.write(data))


def save_npz(path, **arrays) -> epath.Path:
  """`np.savez` of `arrays` written atomically."""
  return atomic_file(path, lambda fh: np.savez(fh, **arrays))


def save_png(path, image_HWC_u8: np.ndarray) -> epath.Path:
  """Writes uint8 (H, W, 3) or (H, W) as a PNG, atomically."""
  from PIL import Image
  img = Image.fromarray(np.asarray(image_HWC_u8, np.uint8))
  return atomic_file(path, lambda fh: img.save(fh, format="PNG"))


def _rmtree_once(path: epath.Path) -> None:
  if is_local(path):
    if os.path.islink(path) or os.path.isfile(path):
      with contextlib.suppress(OSError):
        os.unlink(path)
    else:
      shutil.rmtree(os.fspath(path), ignore_errors=True)
  else:
    with contextlib.suppress(OSError):
      path.rmtree()


def _rmtree(path: epath.Path, settle: float = 1.0, limit: float = 30.0) -> None:
  """Removes a directory tree and keeps it removed for `settle` seconds.

  After a failed Orbax save, tensorstore threads still finish the writes
  they had started (and recreate directories) for a moment after the error
  is raised; removing once would leave those behind.
  """
  start = last_seen = time.monotonic()
  while True:
    now = time.monotonic()
    if now - start >= limit:
      return
    if path.exists():
      _rmtree_once(path)
      last_seen = now
    elif now - last_seen >= settle:
      return
    time.sleep(0.05)


@contextlib.contextmanager
def atomic_dir(out_dir, overwrite: bool = False):
  """Yields a temporary directory that becomes `out_dir` on success.

  Args:
    out_dir: destination directory (local or `gs://`).
    overwrite: replace an existing `out_dir`; without it an existing one is
      an error raised before anything is written.

  Raises:
    CheckpointError: `out_dir` exists and `overwrite` is False.
    WriteError: writing failed; the temporary directory is removed and an
      existing `out_dir` is left as it was.
  """
  out = as_path(out_dir)
  if is_local(out):
    out = out.absolute()
  if out.exists() and not overwrite:
    raise CheckpointError(
        f"{out} already exists; pass --overwrite to replace it")
  if out.exists() and not out.is_dir():
    raise CheckpointError(f"{out} is a file, not a directory; give a "
                          "directory path")
  tmp = None
  try:
    _make_parent(out)
    if is_local(out):
      sweep_stale(out.parent)
      tmp = epath.Path(tempfile.mkdtemp(prefix=temp_prefix(out.name, "tmp"),
                                        dir=os.fspath(out.parent)))
      os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes it 0700.
    else:
      tmp = _unique_sibling(out, "tmp")
      tmp.mkdir(parents=True)
    yield tmp
    if out.exists():
      old = _unique_sibling(out, "old")
      out.rename(old)
      tmp.rename(out)
      _rmtree(old, settle=0)
    else:
      tmp.rename(out)
  except WriteError as e:
    # Name the destination the user gave, not the temporary directory.
    raise WriteError(str(e).replace(os.fspath(tmp), os.fspath(out))
                     if tmp is not None else str(e)) from None
  except OSError as e:
    raise WriteError(describe_os_error(e, out)) from None
  finally:
    if tmp is not None and tmp.exists():
      _rmtree(tmp)


class _DropOrbaxIoErrors(logging.Filter):
  """Drops Orbax's own ERROR records about an I/O fault.

  Orbax logs the fault from each of its threads before raising it;
  `orbax_writes` turns that raise into the one line the user sees.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or "orbax" not in record.pathname:
      return True
    # E.g. "Save Finalize thread (save_finalize) failed.": no errno in the
    # message, the fault is in the attached exception.
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and os_error_of(exc) is not None:
      return False
    msg = record.getMessage()
    return not (_OS_ERROR_CODE.search(msg) or any(
        needle in msg for needle, _ in _STATUS_ERRNO)
                or "Handler Commit operations" in msg)


# Set once this process has run an Orbax save (inside `orbax_writes`).
_ORBAX_SAVED = threading.Event()


class _DropOrphanedIoFutures(logging.Filter):
  """Drops asyncio's "Future exception was never retrieved" for I/O faults.

  After the first failed tensorstore write Orbax stops awaiting the others;
  their futures fail the same way and asyncio reports each one when it is
  collected, sometimes before and sometimes after the save has raised. Only
  records of a process that ran an Orbax save, about an OS-level fault of a
  tensorstore write (an OCDBT or tensorstore error), are dropped; anyone
  else's unretrieved futures (a timeout, a lost connection) stay visible.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if (exc is None or not _ORBAX_SAVED.is_set()
        or "exception was never retrieved" not in record.getMessage()):
      return True
    text = str(exc)
    from_store = "OCDBT" in text or "tensorstore" in text.lower()
    return not (from_store and os_error_of(exc) is not None)


_QUIET_LOCK = threading.Lock()
_QUIET_INSTALLED = False


def _is_closed_loop_noise(unraisable) -> bool:
  exc = unraisable.exc_value
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _install_orbax_quieting() -> None:
  """Once per process: silence the echoes of a failed Orbax write.

  When one tensorstore write fails, Orbax closes its event loop while other
  writes are still in flight; their completion callbacks then raise
  "Event loop is closed" as unraisable exceptions (dozens of tracebacks,
  some after the save has returned), and asyncio logs their failed futures.
  Only those exact echoes are dropped; every other unraisable exception and
  asyncio record still gets through.

  This replaces `sys.unraisablehook` and adds filters to the "absl" and
  "asyncio" loggers, which belong to the whole process: only the command
  line's `main` calls it, never the library.
  """
  global _QUIET_INSTALLED
  with _QUIET_LOCK:
    if _QUIET_INSTALLED:
      return
    previous = sys.unraisablehook

    def hook(unraisable):
      if not _is_closed_loop_noise(unraisable):
        previous(unraisable)

    sys.unraisablehook = hook
    # absl must create its own logger first: a plain "absl" Logger made here
    # would report its own file, not Orbax's, as every record's pathname.
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    absl_logging.get_absl_logger().addFilter(_DropOrbaxIoErrors())
    logging.getLogger("asyncio").addFilter(_DropOrphanedIoFutures())
    _QUIET_INSTALLED = True


@contextlib.contextmanager
def orbax_writes(path):
  """Runs Orbax saves to `path` so that an I/O fault is one `WriteError`.

  Orbax (through tensorstore) raises a full disk as a `ValueError` carrying
  `os_error_code='28'` and echoes it from several threads; inside this
  context it becomes `WriteError("no space left on device writing PATH")`.
  Errors without an OS cause pass unchanged. The echoes are dropped only in
  a process that installed the filters (`_install_orbax_quieting`, done by
  the command line); this context changes no global state.

  Raises:
    WriteError: the save failed for an operating-system reason.
  """
  _ORBAX_SAVED.set()
  try:
    yield
  except WriteError:
    raise
  except Exception as e:  # Orbax raises ValueError/RuntimeError/OSError.
    err = os_error_of(e)
    if err is None:
      raise
    raise WriteError(describe_os_error(err, path)) from None
