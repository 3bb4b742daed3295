"""LPIPS perceptual distance (VGG16 variant, v0.1) over user-supplied weights.

Nothing is downloaded: the weights come from a file the user names.

Accepted weight files (`load_lpips_weights`):

* Two PyTorch files, given as `VGG.pth,LIN.pth`: torchvision's ImageNet VGG16
  (`vgg16-397923af.pth`, keys `features.{i}.weight|bias`) and the LPIPS
  linear heads (`vgg.pth` of the `lpips` package or of taming-transformers,
  keys `lin{k}.model.1.weight`). They are read by the torch-free,
  allowlisted reader `var_jax.convert.pth`.
* One `.npz` holding the same tensors under the same names in the same
  (PyTorch) layout: conv kernels (O, I, 3, 3) and biases (O,) as
  `features.{i}.weight|bias` for the 13 convolutions
  i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), and the five heads
  `lin{k}.model.1.weight` (1, C_k, 1, 1), k = 0..4. `save_lpips_npz` writes
  one from the two `.pth` files. A full LPIPS state dict (VGG under
  `net.slice{n}.{i}.`) is accepted too.

The distance follows the reference: inputs in [-1, 1] are shifted and scaled
per channel, VGG16 features are taken after relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3, unit-normalised over channels, squared differences are
weighted per channel by the heads, averaged over space and summed over the
five layers.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from var_jax.errors import LpipsWeightsError

# torchvision `features` indices of the 13 convolutions, and after which of
# them a feature map is taken (the ReLU that follows it) / a 2x2 max-pool runs.
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_TAPS = (2, 7, 14, 21, 28)
_POOL_BEFORE = (5, 10, 17, 24)
LAYER_CHANNELS = (64, 128, 256, 512, 512)
_CONV_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512,
                  512)
# The reference ScalingLayer, for inputs in [-1, 1].
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
MIN_RESOLUTION = 16  # Four 2x2 pools before relu5_3.


_VGG_RE = re.compile(r"(?:^|\.)(?:features|slice\d)\.(\d+)\.(weight|bias)$")
_LIN_RE = re.compile(r"(?:^|\.)lin(\d)\.(?:model\.\d\.)?weight$")


def _read(path: pathlib.Path) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise LpipsWeightsError(f"LPIPS weights {path}: no such file")
  if path.suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
      raise LpipsWeightsError(f"LPIPS weights {path}: unreadable .npz ({e})"
                              ) from None
  from var_jax.convert.pth import PthError, read_state_dict
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
  for i, cout in zip(CONV_INDICES, _CONV_CHANNELS):
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

  Returns a pytree of float32 numpy arrays for `lpips_distance`.

  Raises:
    LpipsWeightsError: a file is missing or lacks a needed tensor.
  """
  paths = [pathlib.Path(p).expanduser() for p in spec.split(",") if p]
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
  from var_jax.io import save_npz
  save_npz(out, **arrays)


def random_lpips_weights(seed: int = 0) -> dict:
  """He-initialised weights of the right shapes (tests and benchmarks only)."""
  rng = np.random.default_rng(seed)
  convs, cin = [], 3
  for cout in _CONV_CHANNELS:
    std = np.sqrt(2.0 / (9 * cin))
    convs.append(((rng.standard_normal((3, 3, cin, cout)) * std).astype(
        np.float32), np.zeros((cout,), np.float32)))
    cin = cout
  lins = tuple(np.abs(rng.standard_normal((c,))).astype(np.float32) / c
               for c in LAYER_CHANNELS)
  return {"convs": tuple(convs), "lins": lins}


def _vgg_taps(convs, x_BHWC):
  """The five relu feature maps of VGG16."""
  taps, h = [], x_BHWC
  for i, (k, b) in zip(CONV_INDICES, convs):
    if i in _POOL_BEFORE:
      h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                (1, 2, 2, 1), "VALID")
    h = jax.lax.conv_general_dilated(
        h, k.astype(h.dtype), (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + b.astype(h.dtype))
    if i in _TAPS:
      taps.append(h)
  return taps


def lpips_distance(weights, x_BHWC, y_BHWC, dtype=jnp.float32) -> jax.Array:
  """Perceptual distance per image (B,) between images in [-1, 1]."""
  if min(x_BHWC.shape[1:3]) < MIN_RESOLUTION:
    raise ValueError(f"LPIPS needs images of at least {MIN_RESOLUTION}px, "
                     f"got {x_BHWC.shape[1]}x{x_BHWC.shape[2]}")
  b = x_BHWC.shape[0]
  both = jnp.concatenate([x_BHWC, y_BHWC]).astype(jnp.float32)
  both = ((both - _SHIFT) / _SCALE).astype(dtype)
  total = jnp.zeros((b,), jnp.float32)
  for f, w in zip(_vgg_taps(weights["convs"], both), weights["lins"]):
    f = f.astype(jnp.float32)
    f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
    d = (f[:b] - f[b:]) ** 2
    total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", d, w), axis=(1, 2))
  return total
