"""Reading PyTorch `.pth` files without torch, and without trusting them.

A `.pth` (torch >= 1.6) is a zip archive: `<root>/data.pkl` is a pickle whose
tensors point, through persistent ids, at raw little-endian storages stored as
`<root>/data/<key>`. We parse the zip ourselves and unpickle with an allowlist
of globals, so a hostile file cannot run code: any other global is refused.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
from var_jax.errors import PthError

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32,
    "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
  def __init__(self, name):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *_unused):
  arr = storage  # A 1-D numpy array over the whole storage.
  size, stride = tuple(size), tuple(stride)
  if not size:
    if offset >= arr.size:
      raise PthError("a scalar tensor points past the end of its storage")
    return np.array(arr[offset])
  if any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise PthError("a tensor has a negative size or stride")
  if 0 in size:
    return np.zeros(size, arr.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or last >= arr.size:
    raise PthError(f"a tensor of shape {size} reaches element {last} of a "
                   f"storage of {arr.size}: the file is corrupt")
  item = arr.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      arr[offset:], shape=size, strides=tuple(s * item for s in stride),
      writeable=False)
  return np.ascontiguousarray(view)


def _rebuild_parameter(data, *_unused):
  return data


class _Dict(dict):
  """A dict that also takes pickled attributes (state dicts carry _metadata)."""


def _ordered_dict(*args):
  return _Dict(collections.OrderedDict(*args))


def _numpy_scalar(dtype, raw=None):
  return np.frombuffer(raw, dtype=dtype)[0] if raw is not None else dtype.type()


# (module, name) -> what it becomes. Nothing else is ever resolved.
_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): lambda s, enc="latin1": s.encode(enc),
}


class _SafeUnpickler(pickle.Unpickler):

  def __init__(self, fh, zf: zipfile.ZipFile, root: str, path):
    super().__init__(fh)
    self._zf, self._root, self._path = zf, root, path
    self._cache = {}

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    fn = _ALLOWED.get((module, name))
    if fn is None:
      raise PthError(f"refusing to load {self._path}: it references the "
                     f"global {module}.{name}, which a weights file never "
                     "needs")
    return fn

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise PthError(f"{self._path}: unsupported persistent id {pid!r:.60}")
    stype, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(stype, _StorageType):
      raise PthError(f"{self._path}: unknown storage type {stype!r:.60}")
    if key not in self._cache:
      name = f"{self._root}/data/{key}"
      try:
        raw = self._zf.read(name)
      except KeyError:
        raise PthError(f"{self._path}: storage record {key} is missing: the "
                       "file is truncated or corrupt") from None
      arr = np.frombuffer(raw, dtype=stype.dtype.newbyteorder("<"))
      self._cache[key] = arr.astype(stype.dtype, copy=False)
    arr = self._cache[key]
    if isinstance(numel, int) and arr.size < numel:
      raise PthError(f"{self._path}: storage {key} holds {arr.size} elements, "
                     f"the file declares {numel}")
    return arr


def _open(path):
  """A local path as itself, a remote one (gs://) as a seekable file."""
  from var_jax.io import is_local
  return os.fspath(path) if is_local(path) else path.open("rb")


def read_pth(path) -> object:
  """Loads a `.pth` file's object tree with every tensor as a numpy array.

  `path` may be local or `gs://` (etils.epath).

  Raises:
    PthError: missing, legacy-format, truncated or hostile file (named).
  """
  from var_jax.io import as_path
  path = as_path(path)
  if not path.is_file():
    raise PthError(f"{path}: no such file")
  with path.open("rb") as fh:
    head = fh.read(64)
  if not _is_zip(path):
    if _is_legacy(path, head):
      raise PthError(f"{path}: legacy pre-1.6 torch format: re-save it with "
                     "torch.save(obj, path) in torch >= 1.6")
    raise PthError(f"{path}: not a PyTorch checkpoint (not a zip archive; the "
                   "file may be truncated)")
  try:
    with zipfile.ZipFile(_open(path)) as zf:
      pkls = [n for n in zf.namelist() if n.endswith("/data.pkl")
              or n == "data.pkl"]
      if not pkls:
        raise PthError(f"{path}: zip archive without data.pkl: not a PyTorch "
                       "checkpoint")
      root = pkls[0][:-len("data.pkl")].rstrip("/")
      if zf.getinfo(pkls[0]).file_size > 1 << 30:
        raise PthError(f"{path}: data.pkl is implausibly large")
      payload = zf.read(pkls[0])
      byteorder = f"{root}/byteorder"
      if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
        raise PthError(f"{path}: big-endian checkpoints are not supported")
      return _SafeUnpickler(io.BytesIO(payload), zf, root, path).load()
  except PthError:
    raise
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, OSError,
          ValueError, TypeError, IndexError, KeyError, AttributeError,
          MemoryError, RecursionError) as e:
    raise PthError(f"{path}: corrupt checkpoint ({type(e).__name__}: "
                   f"{str(e)[:120]})") from None


def _is_zip(path) -> bool:
  src = _open(path)
  try:
    return zipfile.is_zipfile(src)
  finally:
    if hasattr(src, "close"):
      src.close()


class _NoGlobals(pickle.Unpickler):
  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"global {module}.{name}")


def _is_legacy(path, head: bytes) -> bool:
  """The old format starts with a pickled magic number (no globals needed)."""
  if head[:1] != b"\x80":
    return False
  try:
    with path.open("rb") as fh:
      return _NoGlobals(fh).load() == _LEGACY_MAGIC
  except Exception:  # pylint: disable=broad-except
    return False


def flatten_tensors(obj, prefix: str = "") -> dict[str, np.ndarray]:
  """Nested dicts -> {'a.b.c': array}, keeping only the arrays."""
  out = {}
  if isinstance(obj, np.ndarray):
    out[prefix] = obj
  elif isinstance(obj, dict):
    for k, v in obj.items():
      out.update(flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def read_state_dict(path) -> dict[str, np.ndarray]:
  """A flat {name: array} view of every tensor in the file."""
  return flatten_tensors(read_pth(path))
