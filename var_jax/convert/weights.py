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
from var_jax.errors import ConvertError, PthError

SUFFIX = ".safetensors"
# A Hugging Face checkpoint directory holds one of these (index first).
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
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


def checkpoint_dir_files(root, skip_prefixes: tuple[str, ...] = ()) -> list:
  """The weight files of a Hugging Face checkpoint directory: the shards its
  index (`model.safetensors.index.json` or `pytorch_model.bin.index.json`)
  names for tensors not starting with `skip_prefixes`, else its single
  `model.safetensors` or `pytorch_model.bin`.

  Raises:
    ConvertError: no weights, an index without a weight_map, or shards the
      index names that the directory lacks (all of them named).
  """
  import json  # pylint: disable=import-outside-toplevel
  from var_jax.io import as_path  # pylint: disable=import-outside-toplevel
  root = as_path(root)
  for index in INDEX_FILES:
    if (root / index).is_file():
      try:
        weight_map = json.loads((root / index).read_text())["weight_map"]
        names = sorted({str(f) for k, f in weight_map.items()
                        if not k.startswith(skip_prefixes)})
      except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ConvertError(f"{root / index}: not a checkpoint index (no "
                           "weight_map)") from None
      missing = [f for f in names if not (root / f).is_file()]
      if missing:
        raise ConvertError(f"{root}: {index} names shards the directory "
                           "lacks: " + ", ".join(missing))
      return [root / f for f in names]
  for single in SINGLE_FILES:
    if (root / single).is_file():
      return [root / single]
  raise ConvertError(f"{root}: no weights ({', '.join(SINGLE_FILES)}, or "
                     f"shards listed by {' or '.join(INDEX_FILES)})")


def read_checkpoint_dir(root, skip_prefixes: tuple[str, ...] = ()
                        ) -> dict[str, np.ndarray]:
  """Every tensor of a Hugging Face checkpoint directory (see
  `checkpoint_dir_files`) by name, except those under `skip_prefixes`.

  Raises:
    ConvertError: as `checkpoint_dir_files`, or a name in two shards.
    PthError: an unreadable shard (named).
  """
  sd: dict[str, np.ndarray] = {}
  for f in checkpoint_dir_files(root, skip_prefixes):
    part = {k: v for k, v in read_state_dict(f).items()
            if not k.startswith(skip_prefixes)}
    twice = sorted(set(part) & set(sd))
    if twice:
      raise ConvertError(f"{f}: tensors also found in another shard: "
                         + ", ".join(twice[:5]))
    sd.update(part)
  return sd
