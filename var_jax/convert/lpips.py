"""Reading LPIPS (VGG16) weights from the files a user names.

The network itself is `var_jax.models.lpips` (math only); this module finds
its tensors in PyTorch or npz files and checks their shapes. Nothing is
downloaded.

Accepted weight files (`load_lpips_weights`):

* Two PyTorch files, given as `VGG.pth,LIN.pth`: torchvision's ImageNet VGG16
  (`vgg16-397923af.pth`, keys `features.{i}.weight|bias`) and the LPIPS
  linear heads (`vgg.pth` of the `lpips` package or of taming-transformers,
  keys `lin{k}.model.1.weight`). They are read by the torch-free,
  allowlisted reader `var_jax.convert.pth`.
* One `.npz` holding the same tensors under the same names in the same
  (PyTorch) layout: conv kernels (O, I, 3, 3) and biases (O,) as
  `features.{i}.weight|bias` for the 13 convolutions
  i in `lpips.CONV_INDICES`, and the five heads `lin{k}.model.1.weight`
  (1, C_k, 1, 1), k = 0..4. `save_lpips_npz` writes one from the two `.pth`
  files. A full LPIPS state dict (VGG under `net.slice{n}.{i}.`) is accepted
  too.
"""

from __future__ import annotations

import re

import numpy as np

from var_jax.errors import LpipsWeightsError, PthError
from var_jax.io import as_path, save_npz
from var_jax.models.lpips import CONV_CHANNELS, CONV_INDICES, LAYER_CHANNELS

_VGG_RE = re.compile(r"(?:^|\.)(?:features|slice\d)\.(\d+)\.(weight|bias)$")
_LIN_RE = re.compile(r"(?:^|\.)lin(\d)\.(?:model\.\d\.)?weight$")


def _read(path) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise LpipsWeightsError(f"LPIPS weights {path}: no such file")
  if path.suffix == ".npz":
    try:
      with path.open("rb") as fh, np.load(fh, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
      raise LpipsWeightsError(f"LPIPS weights {path}: unreadable .npz ({e})"
                              ) from None
  from var_jax.convert.weights import read_state_dict
  try:
    return read_state_dict(path)
  except PthError as e:
    raise LpipsWeightsError(f"LPIPS weights: {e}") from None


def _collect(sd: dict[str, np.ndarray], where: str) -> dict:
  """Torch-named tensors -> {'convs': ((HWIO, bias), ...), 'lins': (C,)...}."""
  vgg, lins = {}, {}
  for name, arr in sd.items():
    m = _VGG_RE.search(name)
    if m:
      vgg[(int(m.group(1)), m.group(2))] = arr
      continue
    m = _LIN_RE.search(name)
    if m:
      lins[int(m.group(1))] = arr
  convs = []
  for i, cout in zip(CONV_INDICES, CONV_CHANNELS):
    w, b = vgg.get((i, "weight")), vgg.get((i, "bias"))
    if w is None or b is None:
      part = "weight" if w is None else "bias"
      raise LpipsWeightsError(f"{where} lacks the VGG16 tensor "
                              f"features.{i}.{part} (need torchvision's vgg16 "
                              "weights)")
    if w.shape[0] != cout or w.shape[2:] != (3, 3) or b.shape != (cout,):
      raise LpipsWeightsError(f"{where}: features.{i} has shape {w.shape}, "
                              f"not VGG16's ({cout}, *, 3, 3)")
    convs.append((np.transpose(w, (2, 3, 1, 0)).astype(np.float32),
                  b.astype(np.float32)))
  heads = []
  for k, c in enumerate(LAYER_CHANNELS):
    if k not in lins:
      raise LpipsWeightsError(f"{where} lacks the LPIPS head "
                              f"lin{k}.model.1.weight (need lpips' vgg.pth)")
    if lins[k].size != c:
      raise LpipsWeightsError(f"{where}: lin{k} has {lins[k].size} weights, "
                              f"expected {c}")
    heads.append(lins[k].reshape(c).astype(np.float32))
  return {"convs": tuple(convs), "lins": tuple(heads)}


def load_lpips_weights(spec: str) -> dict:
  """Reads `FILE.npz` or `VGG.pth,LIN.pth` (see the module docstring).

  Returns:
    The pytree `models.lpips.lpips_distance` takes: float32 numpy arrays,
    'convs' 13 x (kernel HWIO, bias) and 'lins' 5 x (C_k,).

  Raises:
    LpipsWeightsError: a file is missing or lacks a needed tensor.
  """
  paths = [as_path(p) for p in spec.split(",") if p]
  if not paths:
    raise LpipsWeightsError("no LPIPS weights file given")
  sd = {}
  for p in paths:
    sd.update(_read(p))
  return _collect(sd, " + ".join(str(p) for p in paths))


def save_lpips_npz(vgg_pth, lin_pth, out) -> None:
  """Writes the single-file `.npz` form from torchvision's and lpips' .pth."""
  weights = load_lpips_weights(f"{vgg_pth},{lin_pth}")  # Validates first.
  arrays = {}
  for i, (k_HWIO, b) in zip(CONV_INDICES, weights["convs"]):
    arrays[f"features.{i}.weight"] = np.transpose(k_HWIO, (3, 2, 0, 1))
    arrays[f"features.{i}.bias"] = b
  for k, w in enumerate(weights["lins"]):
    arrays[f"lin{k}.model.1.weight"] = w.reshape(1, -1, 1, 1)
  save_npz(out, **arrays)
