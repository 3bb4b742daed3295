"""Writes torch-format `.pth` files from numpy without torch (test fixtures).

Emits the pickle opcodes `torch.save` emits (protocol 2, tensors rebuilt by
`torch._utils._rebuild_tensor_v2` from persistent storage records) and packs
the zip the same way, so the reader is tested on realistic bytes. Also writes
deliberately hostile pickles.
"""

from __future__ import annotations

import struct
import zipfile

import ml_dtypes
import numpy as np

_STORAGE = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.float64): "DoubleStorage", np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class _Emitter:

  def __init__(self):
    self.out = bytearray(b"\x80\x02")
    self.storages = []

  def glob(self, module, name):
    self.out += f"c{module}\n{name}\n".encode()

  def value(self, v):
    if isinstance(v, bool):
      self.out += b"\x88" if v else b"\x89"
    elif isinstance(v, int):
      self.out += b"J" + struct.pack("<i", v)
    elif isinstance(v, str):
      b = v.encode()
      self.out += b"X" + struct.pack("<I", len(b)) + b
    elif isinstance(v, tuple):
      self.out += b"("
      for x in v:
        self.value(x)
      self.out += b"t"
    elif isinstance(v, dict):
      self.glob("collections", "OrderedDict")
      self.out += b")R("
      for k, x in v.items():
        self.value(k)
        self.value(x)
      self.out += b"u"
    elif isinstance(v, np.ndarray):
      self.tensor(v)
    else:
      raise TypeError(type(v))

  def tensor(self, a, storage=None, offset=0, shape=None, stride=None):
    if storage is None:
      c = np.array(a, order="C")  # Keeps 0-d arrays 0-d.
      storage, shape = c.reshape(-1), c.shape
      stride = tuple(s // c.itemsize for s in c.strides)
    key = str(len(self.storages))
    self.storages.append((key, storage))
    self.glob("torch._utils", "_rebuild_tensor_v2")
    self.out += b"(("
    self.value("storage")
    self.glob("torch", _STORAGE[storage.dtype])
    self.value(key)
    self.value("cpu")
    self.value(int(storage.size))
    self.out += b"tQ"  # TUPLE, BINPERSID
    self.value(offset)
    self.value(tuple(int(s) for s in shape))
    self.value(tuple(int(s) for s in stride))
    self.value(False)
    self.glob("collections", "OrderedDict")
    self.out += b")Rt"  # empty hooks dict, close args
    self.out += b"R"


def write_pth(path, obj, root="archive") -> None:
  """torch.save-compatible zip of `obj` (dicts, tuples, ints, str, arrays)."""
  e = _Emitter()
  e.value(obj)
  e.out += b"."
  _pack(path, bytes(e.out), e.storages, root)


def write_view_pth(path, name, storage, offset, shape, stride) -> None:
  """A state dict whose one tensor is a strided view into a larger storage."""
  e = _Emitter()
  e.value({})
  e.out = e.out[:-1]  # Reopen the dict: drop the trailing SETITEMS.
  e.value(name)
  e.tensor(None, storage=storage, offset=offset, shape=shape, stride=stride)
  e.out += b"u."
  _pack(path, bytes(e.out), e.storages, "archive")


def write_hostile_pth(path, module, name, arg) -> None:
  """A zip whose pickle calls module.name(arg) on load."""
  e = _Emitter()
  e.glob(module, name)
  e.out += b"("
  e.value(arg)
  e.out += b"tR."
  _pack(path, bytes(e.out), [], "archive")


def _pack(path, pkl, storages, root):
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{root}/data.pkl", pkl)
    zf.writestr(f"{root}/byteorder", "little")
    for key, arr in storages:
      zf.writestr(f"{root}/data/{key}", np.ascontiguousarray(arr).tobytes())
    zf.writestr(f"{root}/version", "3\n")
