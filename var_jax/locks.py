"""One writer per output directory: an exclusive lock on a file inside it.

`DirLock(dir, what=..., flag=...)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on
`DIR/var-jax.lock` and writes the holder's pid into it; a second writer (in
this or another process) is refused at once with one line naming that pid.
The kernel releases the lock when its holder exits in any way, SIGKILL
included, so a lock file left behind by a killed run never blocks the next
one. On release the lock file is removed, and so is the directory when
taking the lock created it and nothing else was written there (a refused run
leaves no directory behind).

`holder_pid(dir)` says, without creating anything, which process holds the
lock (for a check before a long setup); `describe=` lets the caller phrase
the refusal (e.g. sample-many names its `--out`).

Only local directories are locked: object stores (`gs://...`) have no
advisory locks, and `DirLock` on such a path holds nothing.
"""

from __future__ import annotations

import errno
import os
from typing import Callable

from var_jax.errors import UserError, WriteError

LOCK_NAME = "var-jax.lock"


class OutputInUseError(UserError):
  """Another process is writing the same output directory."""


def _busy(e: OSError) -> bool:
  return e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


def _pid_in(fd: int) -> int:
  """The pid written in the lock file open as `fd`; 0 when not readable."""
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
  except OSError:
    return 0
  return int(text) if text.isdigit() else 0


def _shown(pid: int) -> str:
  return f"pid {pid}" if pid > 0 else "a process whose pid is not known"


def holder_pid(directory) -> int | None:
  """The pid of the process holding `directory`'s lock, or None if none does.

  0 when the lock is held but the pid in it cannot be read. Only reads:
  creates nothing (no directory, no lock file). Remote directories are
  never locked (None).
  """
  from var_jax.io import is_local
  path = os.path.join(os.fspath(directory), LOCK_NAME)
  if not is_local(path):
    return None
  import fcntl
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:  # No lock file: nobody holds it.
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except OSError as e:
    if not _busy(e):
      raise
    return _pid_in(fd)
  finally:
    os.close(fd)
  return None


class DirLock:
  """Context manager (or `acquire()`/`release()`) holding `dir`'s lock.

  Args:
    directory: the output directory (created if missing; local paths only).
    what: names the output in the refusal ('workdir', '--out').
    flag: the flag the user can change to pick another directory.
    describe: if given, the refusal's text from the holder's pid (0: not
      known), in place of the default naming `what`, the pid and `flag`.
    shown: the path a failure to create the directory or the lock file
      names (default: the lock file), e.g. the output the user gave.

  Raises (from `acquire`):
    OutputInUseError: another writer holds the lock; names its pid.
    WriteError: the directory or the lock file cannot be created.
  """

  def __init__(self, directory, *, what: str = "directory",
               flag: str = "--out",
               describe: Callable[[int], str] | None = None,
               shown=None):
    from var_jax.io import is_local
    self.dir = os.fspath(directory)
    self.shown = shown
    self.active = is_local(self.dir)
    self.path = os.path.join(self.dir, LOCK_NAME)
    self.what, self.flag, self.describe = what, flag, describe
    self._fd: int | None = None
    self._created: list[str] = []

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> "DirLock":
    if not self.active or self._fd is not None:
      return self
    import fcntl
    try:
      self._created = []
      while True:
        fd = self._open()
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
          if not _busy(e):
            os.close(fd)
            raise
          pid = _pid_in(fd)
          os.close(fd)
          self._remove_created()
          raise OutputInUseError(self._refusal(pid)) from None
        # The holder before us may have removed the file on release: a lock
        # on that unlinked file would lock nothing. Retry on the new file.
        try:
          same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
          same = False
        if same:
          break
        os.close(fd)
      os.ftruncate(fd, 0)
      os.write(fd, f"{os.getpid()}\n".encode())
    except OutputInUseError:
      raise
    except OSError as e:
      from var_jax.io import describe_os_error
      self._remove_created()
      raise WriteError(describe_os_error(
          e, self.path if self.shown is None else self.shown)) from None
    self._fd = fd
    return self

  def _open(self) -> int:
    """Opens the lock file, creating it and its directory (again, if a
    finishing holder removed the directory meanwhile)."""
    tries = 3
    while True:
      self._created += _make_dirs(self.dir)
      try:
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except FileNotFoundError:
        tries -= 1
        if not tries:
          raise

  def _refusal(self, pid: int) -> str:
    if self.describe is not None:
      return self.describe(pid)
    return (f"{self.what} {self.dir} is in use by another run "
            f"({_shown(pid)} holds {self.path}); wait for it to finish or "
            f"pass another {self.flag}")

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      # While still locked: nobody holds a stale file. Only our own file: the
      # holder may have removed the directory, and a new holder made another.
      if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
        os.unlink(self.path)
    except OSError:
      pass
    os.close(fd)
    self._remove_created()

  def _remove_created(self) -> None:
    """Removes the directories `acquire` created, if they are empty."""
    for d in reversed(self._created):
      try:
        os.rmdir(d)
      except OSError:  # Not empty: the run wrote there.
        break
    self._created = []

  def __enter__(self) -> "DirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _make_dirs(d: str) -> list[str]:
  """Creates `d` and missing parents; returns those created, outermost first."""
  missing = []
  d = os.path.abspath(d)
  while not os.path.isdir(d):
    missing.append(d)
    parent = os.path.dirname(d)
    if parent == d:
      break
    d = parent
  created = []
  for m in reversed(missing):
    try:
      os.mkdir(m)
      created.append(m)
    except FileExistsError:
      pass
  return created
