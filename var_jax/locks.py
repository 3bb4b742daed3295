"""One writer per output directory: an exclusive lock on a file inside it.

`DirLock(dir, what=..., flag=...)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on
`DIR/var-jax.lock` and writes the holder's pid into it; a second writer (in
this or another process) is refused at once with one line naming that pid.
The kernel releases the lock when its holder exits in any way, SIGKILL
included, so a lock file left behind by a killed run never blocks the next
one. On release the lock file is removed, and so is the directory when
taking the lock created it and nothing else was written there (a refused run
leaves no directory behind).

Only local directories are locked: object stores (`gs://...`) have no
advisory locks, and `DirLock` on such a path holds nothing.
"""

from __future__ import annotations

import errno
import os

from var_jax.errors import UserError, WriteError

LOCK_NAME = "var-jax.lock"


class OutputInUseError(UserError):
  """Another process is writing the same output directory."""


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      pid = f.read().strip()
  except OSError:
    pid = ""
  return f"pid {pid}" if pid.isdigit() else "a process whose pid is not known"


class DirLock:
  """Context manager (or `acquire()`/`release()`) holding `dir`'s lock.

  Args:
    directory: the output directory (created if missing; local paths only).
    what: names the output in the refusal ('workdir', '--out').
    flag: the flag the user can change to pick another directory.

  Raises (from `acquire`):
    OutputInUseError: another writer holds the lock; names its pid.
    WriteError: the directory or the lock file cannot be created.
  """

  def __init__(self, directory, *, what: str = "directory",
               flag: str = "--out"):
    from var_jax.io import is_local
    self.dir = os.fspath(directory)
    self.active = is_local(self.dir)
    self.path = os.path.join(self.dir, LOCK_NAME)
    self.what, self.flag = what, flag
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
      self._created = _make_dirs(self.dir)
      while True:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
          os.close(fd)
          if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
          self._remove_created()
          raise OutputInUseError(
              f"{self.what} {self.dir} is in use by another run "
              f"({_holder(self.path)} holds {self.path}); wait for it to "
              f"finish or pass another {self.flag}") from None
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
      raise WriteError(describe_os_error(e, self.path)) from None
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.unlink(self.path)  # While still locked: nobody holds a stale file.
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
