"""Weight files in either format official checkpoints ship in.

`.pth` (PyTorch zip archives, read without torch by `var_jax.convert.pth`)
and `.safetensors` (read with the `safetensors` package's NumPy reader, an
optional dependency). A file is taken as safetensors when its name ends in
`.safetensors` or its bytes start like one (an 8-byte little-endian header
length followed by the JSON header's `{`); everything else goes to the
`.pth` reader, whose errors name what is wrong.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from var_jax.convert.pth import flatten_tensors, read_pth
from var_jax.errors import PthError

SUFFIX = ".safetensors"
INSTALL_HINT = ("pip install safetensors (from a checkout: pip install "
                "'.[safetensors]')")


def _looks_like_safetensors(path) -> bool:
  try:
    with path.open("rb") as fh:
      head = fh.read(9)
  except OSError:
    return False
  if len(head) < 9 or head[8:9] != b"{":
    return False
  (size,) = struct.unpack("<Q", head[:8])
  return 0 < size < 1 << 30


def is_safetensors(path) -> bool:
  """True for a `.safetensors` name or a file that starts like one."""
  return os.fspath(path).endswith(SUFFIX) or _looks_like_safetensors(path)


def read_safetensors(path) -> dict[str, np.ndarray]:
  """Every tensor of a `.safetensors` file, as NumPy arrays by name.

  Raises:
    PthError: `safetensors` is not installed (with the install command),
      or the file is missing, truncated or not a safetensors file.
  """
  from var_jax.io import as_path, is_local
  path = as_path(path)
  try:
    from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
    from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise PthError(f"{path}: reading .safetensors files needs the "
                   f"safetensors package: {INSTALL_HINT}") from None
  if not path.is_file():
    raise PthError(f"{path}: no such file")
  try:
    if is_local(path):
      sd = st_numpy.load_file(os.fspath(path))
    else:
      sd = st_numpy.load(path.read_bytes())
  except (SafetensorError, OSError, ValueError, TypeError, KeyError) as e:
    cause = " ".join(str(e).split())[:160] or type(e).__name__
    raise PthError(f"{path}: not a readable safetensors file ({cause}); the "
                   "file may be truncated") from None
  return {k: np.asarray(v) for k, v in sd.items()}


def read_weights(path) -> object:
  """A weight file's tensors: a `.safetensors` file's flat {name: array},
  or a `.pth` file's object tree (`read_pth`).

  Raises:
    PthError: an unreadable, truncated or hostile file (named).
  """
  from var_jax.io import as_path
  path = as_path(path)
  if path.is_file() and is_safetensors(path):
    return read_safetensors(path)
  return read_pth(path)


def read_state_dict(path) -> dict[str, np.ndarray]:
  """A flat {name: array} view of every tensor in a `.pth` or
  `.safetensors` file."""
  return flatten_tensors(read_weights(path))
