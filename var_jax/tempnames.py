"""Names of the temporaries var-jax writes, and removing stale ones.

Temporaries are named `.NAME.tmp-HOST-PID-RANDOM` (and a directory being
replaced `.NAME.old-HOST-PID-RANDOM`), HOST a digest of the host name and
PID the writing process. A process killed outright (SIGKILL, power loss)
cannot remove its temporary; the first local write of a later process into
the same directory removes every temporary of this naming whose process,
on this host, no longer runs (`sweep_stale`). An `.old-` directory is kept
while its destination is missing: it is then the only copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import threading


def host_tag() -> str:
  """Six hex digits naming this host in our temporaries' names."""
  return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def temp_prefix(name: str, tag: str) -> str:
  """`.NAME.TAG-HOST-PID-`: a temporary's name, less its random end."""
  return f".{name}.{tag}-{host_tag()}-{os.getpid()}-"


_OURS = re.compile(r"\.(?P<name>.+)\.(?P<tag>tmp|old)-(?P<host>[0-9a-f]{6})-"
                   r"(?P<pid>\d+)-[A-Za-z0-9_]+")
_SWEPT: set[str] = set()
_SWEPT_LOCK = threading.Lock()


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):
    return True  # Someone else's process, or not a pid: not ours to judge.
  return True


def sweep_stale(directory) -> list[str]:
  """Removes the temporaries a killed process of this host left in a local
  `directory`; returns their names. Done once per directory and process
  (every write calls it); remote directories are left alone."""
  if "://" in os.fspath(directory):
    return []
  d = os.path.abspath(os.path.expanduser(os.fspath(directory)))
  with _SWEPT_LOCK:
    if d in _SWEPT:
      return []
    try:
      names = os.listdir(d)
    except OSError:
      return []
    _SWEPT.add(d)
  removed, host = [], host_tag()
  for name in names:
    m = _OURS.fullmatch(name)
    if (m is None or m["host"] != host or int(m["pid"]) == os.getpid()
        or _running(int(m["pid"]))):
      continue
    if m["tag"] == "old" and not os.path.exists(os.path.join(d, m["name"])):
      continue  # The destination is gone: this is the only copy.
    path = os.path.join(d, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.unlink(path)
    removed.append(name)
  return removed
