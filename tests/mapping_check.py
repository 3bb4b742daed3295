"""One check for every converter's name table against a released key list:
each official key and shape is in the table, and each rule's transform
carries that shape onto the abstract model's parameter (a layer slice for
stacked block parameters); every parameter has a source."""

import numpy as np
from flax import nnx


def check_mapping(rules, entries: dict, abstract_state) -> None:
  """`entries`: {official key: shape} of a released checkpoint;
  `abstract_state`: the model's state from `nnx.eval_shape` (no weights)."""
  by_name = {r.official: r for r in rules}
  assert set(by_name) == set(entries), sorted(set(by_name) ^ set(entries))[:10]
  ours = {p: tuple(v.shape) for p, v in nnx.to_flat_state(abstract_state)}
  covered = set()
  for key, shape in entries.items():
    r = by_name[key]
    assert tuple(r.official_shape) == tuple(shape), key
    if r.derived:
      continue
    # A zero-strided view: the transform sees the full shape, no memory.
    moved = r.transform(np.broadcast_to(np.float32(0), tuple(shape))).shape
    want = ours[r.path][1:] if r.layer is not None else ours[r.path]
    assert tuple(moved) == tuple(want), (key, moved, want)
    covered.add(r.path)
  assert covered == set(ours), sorted(set(ours) - covered)


def shapes_only(entries: dict) -> dict:
  """{key: a zero-strided array of that shape}: enough to read a config
  off a key list."""
  return {k: np.broadcast_to(np.float32(0), tuple(v))
          for k, v in entries.items()}
