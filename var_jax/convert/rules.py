"""Explicit name tables from official state dicts to our NNX trees.

A family's table is a list of `Rule`s: where each official tensor lands (our
path, and a layer index for stacked blocks) and how its layout changes.
Buffers an official model carries but we compute are rules with an empty
path ("derived"): checked by the family, never loaded. Applying a table
collects every unknown, missing or misshaped key into one `ConvertError`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from flax import nnx

from var_jax.errors import ConvertError


def same(a):
  return a


def linear(a):  # torch (out, in) -> ours (in, out)
  return a.T


def conv(a):  # torch (out, in, kh, kw) -> ours (kh, kw, in, out)
  return a.transpose(2, 3, 1, 0)


@dataclasses.dataclass(frozen=True)
class Rule:
  official: str
  path: tuple  # Our path (tuple of str/int); () for derived buffers.
  official_shape: tuple
  transform: Callable = same
  layer: int | None = None  # Index into a stacked (depth, ...) parameter.

  @property
  def derived(self) -> bool:
    return not self.path


def conv_rules(off: str, ours: tuple, cin: int, cout: int, k: int,
               wrap: str = "") -> list[Rule]:
  """A convolution's kernel and bias (official `{off}{wrap}.weight`)."""
  return [Rule(f"{off}{wrap}.weight", ours + ("kernel",), (cout, cin, k, k),
               conv),
          Rule(f"{off}{wrap}.bias", ours + ("bias",), (cout,))]


def norm_rules(off: str, ours: tuple, c: int, wrap: str = "") -> list[Rule]:
  """A GroupNorm's scale and bias."""
  return [Rule(f"{off}{wrap}.weight", ours + ("scale",), (c,)),
          Rule(f"{off}{wrap}.bias", ours + ("bias",), (c,))]


_WRAPPERS = ("module.", "_orig_mod.")


def strip_prefixes(sd: dict) -> dict:
  """Removes DDP/FSDP (`module.`) and torch.compile (`_orig_mod.`) prefixes."""
  out = {}
  for k, v in sd.items():
    changed = True
    while changed:
      changed = False
      for p in _WRAPPERS:
        if k.startswith(p):
          k, changed = k[len(p):], True
    k = k.replace("._orig_mod.", ".").replace("._fsdp_wrapped_module.", ".")
    out[k] = v
  return out


def _fmt(shape):
  return "(" + ",".join(str(s) for s in shape) + ")"


def check_keys(rules: list[Rule], sd: dict, what: str) -> None:
  """Raises one ConvertError naming every unknown, missing or misshaped key."""
  by_name = {r.official: r for r in rules}
  problems = []
  # Derived buffers are optional: some files leave them out.
  missing = [n for n, r in by_name.items() if n not in sd and not r.derived]
  unknown = [k for k in sd if k not in by_name]
  for name, arr in sd.items():
    r = by_name.get(name)
    if r is not None and tuple(arr.shape) != tuple(r.official_shape):
      problems.append(f"{name}: expected {_fmt(r.official_shape)}, "
                      f"found {_fmt(arr.shape)}")
  if missing:
    problems.append("missing keys: " + ", ".join(missing))
  if unknown:
    problems.append("unknown keys: " + ", ".join(unknown))
  if problems:
    raise ConvertError(f"{what} checkpoint does not match the model: "
                       + "; ".join(problems))


def official_to_flat(abstract_state, rules: list[Rule], sd: dict, what: str,
                     check_derived: Callable[[list[Rule], dict], None]
                     | None = None) -> dict:
  """Checks an official state dict and lays it out as {our path: np.ndarray}.

  `abstract_state` only supplies paths and shapes (e.g. from nnx.eval_shape),
  so conversion never materialises a randomly initialised model.
  `check_derived(rules, sd)` raises when the file's derived buffers
  disagree with the model.
  """
  sd = strip_prefixes(sd)
  check_keys(rules, sd, what)
  if check_derived is not None:
    check_derived(rules, sd)
  shapes = {p: tuple(v.shape) for p, v in nnx.to_flat_state(abstract_state)}
  values = {}
  for r in rules:
    if r.derived:
      continue
    if r.path not in shapes:
      raise ConvertError(f"internal: no parameter {r.path} in the model")
    arr = r.transform(np.asarray(sd[r.official], np.float32))
    if r.layer is None:
      values[r.path] = np.ascontiguousarray(arr)
    else:
      if r.path not in values:
        values[r.path] = np.zeros(shapes[r.path], np.float32)
      values[r.path][r.layer] = arr
  unfilled = sorted(set(shapes) - set(values))
  if unfilled:
    raise ConvertError(f"internal: {what} parameters without a source: "
                       f"{unfilled}")
  for path, arr in values.items():
    if arr.shape != shapes[path]:
      raise ConvertError(f"internal: {path} is {arr.shape}, model has "
                         f"{shapes[path]}")
  return values


def flat_to_pure(values: dict) -> dict:
  """{path tuple: array} -> the nested pure dict Orbax and nnx use."""
  out = {}
  for path, arr in values.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = arr
  return out


def to_official(rule: Rule, ours: np.ndarray) -> np.ndarray:
  """Our layout (one layer's slice if stacked) back to the official shape."""
  if rule.transform is conv:
    return ours.transpose(3, 2, 0, 1)
  if rule.transform is linear:
    return ours.T
  return ours.reshape(rule.official_shape)


def export_flat(flat: dict, rules: list[Rule]) -> dict:
  """Our parameters (or gradients), a {path: array} dict, in official names."""
  out = {}
  for r in rules:
    if r.derived or r.path not in flat:
      continue
    a = np.asarray(flat[r.path])
    out[r.official] = to_official(r, a if r.layer is None else a[r.layer])
  return out
