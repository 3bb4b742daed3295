"""torch-fidelity's InceptionV3 weights -> `var_jax.models.inception`.

Reads `weights-inception-2015-12-05-6726825d.pth` (torch-fidelity's
conversion of the TF graph of 2015-12-05) with the torch-free `.pth` reader
and maps every tensor through an explicit name table: conv kernels
(O, I, kh, kw) -> HWIO, the classifier (1008, 2048) -> (2048, 1008),
BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var.
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` uses the same key names
(both follow torchvision's module names) and loads the same way.
`num_batches_tracked` entries are accepted and ignored (inference never reads
them; converted files often leave them out).
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.errors import InceptionWeightsError, PthError
from var_jax.models.abstract import abstract_split
from var_jax.models.inception import InceptionV3

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/"
               f"v0.2.0/{WEIGHTS_NAME}")
PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                   "fid_weights/pt_inception-2015-12-05-6726825d.pth")

# Every BasicConv2d of the network, by torch module name.
_STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1",
         "Conv2d_4a_3x3")
_A = ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1",
      "branch3x3dbl_2", "branch3x3dbl_3", "branch_pool")
_B = ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")
_C = ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3",
      "branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4",
      "branch7x7dbl_5", "branch_pool")
_D = ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2",
      "branch7x7x3_3", "branch7x7x3_4")
_E = ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b",
      "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3a",
      "branch3x3dbl_3b", "branch_pool")
_BLOCKS = (("Mixed_5b", _A), ("Mixed_5c", _A), ("Mixed_5d", _A),
           ("Mixed_6a", _B), ("Mixed_6b", _C), ("Mixed_6c", _C),
           ("Mixed_6d", _C), ("Mixed_6e", _C), ("Mixed_7a", _D),
           ("Mixed_7b", _E), ("Mixed_7c", _E))
_OIHW_TO_HWIO = (2, 3, 1, 0)
# torch suffix of a BasicConv2d tensor -> (our attribute path, permutation).
_CONV_PARTS = (("conv.weight", ("conv", "kernel"), _OIHW_TO_HWIO),
               ("bn.weight", ("bn", "scale"), None),
               ("bn.bias", ("bn", "bias"), None),
               ("bn.running_mean", ("bn", "mean"), None),
               ("bn.running_var", ("bn", "var"), None))
_IGNORED_SUFFIX = ".num_batches_tracked"


def conv_names() -> list[str]:
  """Torch module names of the 94 BasicConv2d layers, in network order."""
  names = list(_STEM)
  for block, branches in _BLOCKS:
    names += [f"{block}.{b}" for b in branches]
  return names


def name_table() -> dict[str, tuple[tuple[str, ...], tuple[int, ...] | None]]:
  """torch state-dict key -> (our nnx state path, axis permutation or None)."""
  table = {}
  for name in conv_names():
    path = tuple(name.split("."))
    for suffix, ours, perm in _CONV_PARTS:
      table[f"{name}.{suffix}"] = (path + ours, perm)
  table["fc.weight"] = (("fc", "kernel"), (1, 0))
  table["fc.bias"] = (("fc", "bias"), None)
  return table


def _fmt(shape) -> str:
  return "(" + ",".join(str(int(s)) for s in shape) + ")"


def _listing(label: str, items: list[str], limit: int = 8) -> str:
  more = f" and {len(items) - limit} more" if len(items) > limit else ""
  return f"{len(items)} {label} ({', '.join(items[:limit])}{more})"


def missing_file_message(path) -> str:
  return (f"Inception weights {path}: no such file; download torch-fidelity's "
          f"{WEIGHTS_NAME} from {WEIGHTS_URL} and pass it with --inception")


def read_inception_state_dict(path) -> dict[str, np.ndarray]:
  """The tensors of a `.pth` file, as numpy, with `module.` prefixes removed.

  Raises:
    InceptionWeightsError: missing or unreadable file (the message names
      where to get the weights).
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise InceptionWeightsError(missing_file_message(path))
  from var_jax.convert.weights import read_state_dict
  try:
    sd = read_state_dict(path)
  except PthError as e:
    raise InceptionWeightsError(f"Inception weights: {e}") from None
  out = {}
  for k, v in sd.items():
    while k.startswith("module."):
      k = k[len("module."):]
    out[k] = v
  return out


def convert_state_dict(sd: dict[str, np.ndarray], where: str = "state dict",
                       dtype=jnp.float32) -> InceptionV3:
  """Builds an `InceptionV3` from torch-fidelity-named tensors.

  Args:
    sd: {torch key: numpy array}.
    where: how to name the source in errors (a file name).
    dtype: activation dtype of the model (weights stay float32).

  Raises:
    InceptionWeightsError: one error listing every missing, unknown and
      misshaped key (expected torch shape vs found).
  """
  table = name_table()
  graphdef, state = abstract_split(InceptionV3, dtype=dtype)
  flat = dict(nnx.to_flat_state(state))
  missing = [k for k in table if k not in sd]
  unknown = [k for k in sd if k not in table
             and not k.endswith(_IGNORED_SUFFIX)]
  misshaped, values = [], {}
  for key, (path, perm) in table.items():
    if key not in sd:
      continue
    arr = np.asarray(sd[key])
    want = flat[path].value.shape
    torch_want = want if perm is None else tuple(
        want[perm.index(i)] for i in range(len(perm)))
    if tuple(arr.shape) != tuple(torch_want):
      misshaped.append(f"{key} {_fmt(arr.shape)} != {_fmt(torch_want)}")
      continue
    if not np.issubdtype(arr.dtype, np.floating):
      misshaped.append(f"{key} has dtype {arr.dtype}, not a float")
      continue
    values[path] = (arr if perm is None else np.transpose(arr, perm))
  problems = []
  if missing:
    problems.append(_listing("missing keys", missing))
  if misshaped:
    problems.append(_listing("misshaped keys", misshaped))
  if unknown:
    problems.append(_listing("unknown keys", unknown))
  if problems:
    raise InceptionWeightsError(
        f"Inception weights {where} do not fit torch-fidelity's InceptionV3 "
        f"(the TF 2015-12-05 FID network): {'; '.join(problems)}")
  for path, var in flat.items():
    var.value = jnp.asarray(np.ascontiguousarray(values[path], np.float32))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_inception(path, dtype=jnp.float32) -> InceptionV3:
  """Reads and converts a weights file (see the module docstring).

  Raises:
    InceptionWeightsError: missing/unreadable file or keys that do not fit.
  """
  sd = read_inception_state_dict(path)
  return convert_state_dict(sd, where=str(path), dtype=dtype)


def torch_keys() -> list[tuple[str, tuple[int, ...], str]]:
  """(key, shape, dtype) of torch-fidelity's state dict, in its order.

  Includes the int64 `num_batches_tracked` scalars torch's BatchNorm keeps,
  so the list is the whole state dict of `FeatureExtractorInceptionV3`.
  """
  table = name_table()
  flat = dict(nnx.to_flat_state(abstract_split(InceptionV3)[1]))
  out = []
  for key, (path, perm) in table.items():
    want = flat[path].value.shape
    shape = want if perm is None else tuple(
        want[perm.index(i)] for i in range(len(perm)))
    out.append((key, tuple(int(s) for s in shape), "float32"))
    if key.endswith("bn.running_var"):
      out.append((key[:-len("running_var")] + "num_batches_tracked", (),
                  "int64"))
  return out


def random_state_dict(seed: int = 0, keys=None) -> dict[str, np.ndarray]:
  """Random torch-layout weights by the golden set's seed recipe.

  Key i (0-based, state-dict order) draws from `default_rng([seed, i])`:
  conv weights He-normal over fan_in = prod(shape[1:]), BatchNorm weight
  1 + 0.1 N, bias and running mean 0.1 N, running var U(0.5, 1.5), fc weight
  N / sqrt(2048), fc bias 0.1 N, `num_batches_tracked` 0; floats cast to
  float32 last. Used for tests and benchmarks (the figures mean nothing).

  Args:
    seed: the recipe's seed (the golden set uses 0).
    keys: (key, shape, dtype) triples; default `torch_keys()`.
  """
  out = {}
  for i, (key, shape, dtype) in enumerate(keys or torch_keys()):
    shape = tuple(shape)
    rng = np.random.default_rng([seed, i])
    if dtype == "int64":
      out[key] = np.zeros(shape, np.int64)
      continue
    if key.endswith("conv.weight"):
      a = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif key.endswith("bn.weight"):
      a = 1.0 + 0.1 * rng.standard_normal(shape)
    elif key.endswith("running_var"):
      a = rng.uniform(0.5, 1.5, shape)
    elif key == "fc.weight":
      a = rng.standard_normal(shape) / np.sqrt(shape[1])
    else:  # bn.bias, running_mean, fc.bias
      a = 0.1 * rng.standard_normal(shape)
    out[key] = a.astype(np.float32)
  return out


def default_weights_path():
  """The first weights file found where users keep it, else None.

  Looked at: `$VAR_JAX_INCEPTION`, then torch hub's checkpoint folder
  (`$TORCH_HOME/hub/checkpoints`, default `~/.cache/torch/hub/checkpoints`),
  where torch-fidelity and pytorch-fid download their files.
  """
  import os
  env = os.environ.get("VAR_JAX_INCEPTION")
  if env:
    return pathlib.Path(env).expanduser()
  torch_home = pathlib.Path(os.environ.get(
      "TORCH_HOME", pathlib.Path("~/.cache/torch").expanduser()))
  for name in (WEIGHTS_NAME, "pt_inception-2015-12-05-6726825d.pth"):
    cand = torch_home / "hub" / "checkpoints" / name
    if cand.is_file():
      return cand
  return None
