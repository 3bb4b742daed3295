"""Collaborative decoding (CoDe, Chen et al., CVPR 2025): two VARs, one image.

A large "drafter" draws the coarse scales 0..N-1, where most of an image's
content is decided with few tokens; a small "refiner" draws the fine scales
N..K-1, which hold most of the tokens. Both read and write the same f_hat, so
they must share the tokenizer.

The hand-over follows czg1225/CoDe `models/var.py`: the drafter
(`autoregressive_infer_cfg_draft`) returns f_hat and the raw teacher-forcing
inputs it built for scales 1..N (its `token_hub`); the refiner
(`autoregressive_infer_cfg_refine`) runs its start token plus those inputs
through its blocks in one block-causal pass, which fills its KV cache and
gives the logits of scale N, then continues scale by scale. Guidance ramps
with `t = cfg * si / (K - 1)` in both models, as in plain sampling.

Here the whole pair is one jitted program (`Sampler(..., drafter=...)`: two
`loop.run`s, the second starting with `VAR.prefill`), and the token draws
keep their keys (seed, scale, sample, position), so the drafter's scales are
exactly those of a plain drafter run with the same seed.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from var_jax.errors import IncompatibleModelsError


def check_same_tokenizer(vae_a, vae_b, name_a="drafter",
                         name_b="refiner") -> None:
  """Checks that two VQVAEs are the same tokenizer (config and weights).

  Raises:
    IncompatibleModelsError: the differing config fields, each with both
      values, or the first differing weight, by name.
  """
  if vae_a.cfg != vae_b.cfg:
    diff = [f"{f}: {name_a} {getattr(vae_a.cfg, f)!r}, {name_b} "
            f"{getattr(vae_b.cfg, f)!r}"
            for f in vae_a.cfg.__dataclass_fields__
            if getattr(vae_a.cfg, f) != getattr(vae_b.cfg, f)]
    raise IncompatibleModelsError(
        f"the {name_a} and {name_b} tokenizers differ ({'; '.join(diff)}); "
        "collaborative decoding needs both models trained on one VQVAE")
  flat_a = nnx.to_flat_state(nnx.state(vae_a, nnx.Param))
  flat_b = dict(nnx.to_flat_state(nnx.state(vae_b, nnx.Param)))
  for path, var in flat_a:
    other = flat_b.get(path)
    if other is None or not np.array_equal(np.asarray(var.get_value()),
                                           np.asarray(other.get_value())):
      name = "/".join(str(p) for p in path)
      raise IncompatibleModelsError(
          f"the {name_a} and {name_b} tokenizers have different weights "
          f"({name}); collaborative decoding needs both models trained on "
          "one VQVAE")
