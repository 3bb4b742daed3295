"""Fingerprints that tie a cache to what it was made from.

Three kinds, each a short hex string:

- `files_fingerprint(paths)`: the path, size and modification time of every
  file (no byte is read). For image folders: a file rewritten, added,
  removed or renamed changes it; a file copied with its times kept
  (`cp -p`, `rsync -t`) and the same name does not.
- `StreamHash`: a content hash (SHA-256) fed while a file is streamed,
  for npz inputs: any changed byte changes it.
- `tree_fingerprint(tree)`: the names, dtypes, shapes and bytes of every
  array of a (nested) tree of weights, independent of where or how the
  weights were stored (a copied or re-saved model directory keeps it).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

_LEN = 16  # Hex digits kept: 64 bits, plenty against accidental equality.


def files_fingerprint(paths, root=None) -> str:
  """Hash of (path relative to `root`, size, mtime in ns) of every file.

  `paths` are local paths or epath paths (`gs://...`: the backend's size
  and modification time).
  """
  h = hashlib.sha256()
  for p in paths:
    name = os.fspath(p)
    if root is not None:
      name = os.path.relpath(name, os.fspath(root)) if "://" not in name \
          else name[len(os.fspath(root)):]
    h.update(name.encode("utf-8", "surrogateescape") + b"\0")
    h.update(_stat_key(p).encode() + b"\n")
  return h.hexdigest()[:_LEN]


def _stat_key(p) -> str:
  name = os.fspath(p)
  if "://" not in name:
    st = os.stat(name)
    return f"{st.st_size}:{st.st_mtime_ns}"
  from var_jax.io import as_path
  st = as_path(name).stat()  # epath.StatResult: length, mtime (seconds).
  return f"{getattr(st, 'length', '')}:{getattr(st, 'mtime', '')}"


class StreamHash:
  """SHA-256 of bytes fed in order (`update`), as a short hex string."""

  def __init__(self):
    self._h = hashlib.sha256()

  def update(self, data) -> None:
    self._h.update(data)

  def hexdigest(self) -> str:
    return self._h.hexdigest()[:_LEN]


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    for k in sorted(tree, key=str):
      yield from _flat(tree[k], f"{prefix}/{k}")
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _flat(v, f"{prefix}/{i}")
  elif tree is not None:
    yield prefix, tree


def tree_fingerprint(tree) -> str:
  """Hash of every array leaf of nested dicts/lists (name, dtype, shape,
  bytes). Leaves may be numpy or (fully addressable) jax arrays."""
  h = hashlib.sha256()
  for name, leaf in _flat(tree):
    a = np.ascontiguousarray(np.asarray(getattr(leaf, "value", leaf)))
    h.update(f"{name}:{a.dtype.str}:{a.shape}\n".encode())
    h.update(a.data)
  return h.hexdigest()[:_LEN]
