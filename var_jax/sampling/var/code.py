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

from var_jax.errors import CheckpointError, UserError


def check_pair(var_cfg, vae_cfg, drafter=None) -> None:
  """Checks that a VAR (and a drafter) can sample with this tokenizer.

  Raises:
    UserError: a different scale list, vocabulary, code width or class
      count, naming both values.
  """
  if drafter is not None:
    for field in ("patch_nums", "vocab_size", "cvae", "num_classes"):
      a, b = getattr(drafter.cfg, field), getattr(var_cfg, field)
      if tuple(np.atleast_1d(a)) != tuple(np.atleast_1d(b)):
        raise UserError(f"drafter and refiner differ in {field}: {a} vs {b}; "
                        "collaborative decoding needs one tokenizer and one "
                        "scale list")
  if (vae_cfg.vocab_size, vae_cfg.z_channels) != (var_cfg.vocab_size,
                                                  var_cfg.cvae):
    raise UserError(f"the tokenizer has vocab {vae_cfg.vocab_size} / Cvae "
                    f"{vae_cfg.z_channels} but the models expect "
                    f"{var_cfg.vocab_size} / {var_cfg.cvae}")


def check_same_tokenizer(vae_a, vae_b, name_a="drafter",
                         name_b="refiner") -> None:
  """Checks that two VQVAEs are the same tokenizer (config and weights).

  Raises:
    CheckpointError: the first differing config field or weight, by name.
  """
  if vae_a.cfg != vae_b.cfg:
    diff = [f for f in vae_a.cfg.__dataclass_fields__
            if getattr(vae_a.cfg, f) != getattr(vae_b.cfg, f)]
    raise CheckpointError(f"the {name_a} and {name_b} tokenizers differ "
                          f"({', '.join(diff)}); collaborative decoding needs "
                          "both models trained on one VQVAE")
  flat_a = nnx.to_flat_state(nnx.state(vae_a, nnx.Param))
  flat_b = dict(nnx.to_flat_state(nnx.state(vae_b, nnx.Param)))
  for path, var in flat_a:
    other = flat_b.get(path)
    if other is None or not np.array_equal(np.asarray(var.get_value()),
                                           np.asarray(other.get_value())):
      name = "/".join(str(p) for p in path)
      raise CheckpointError(f"the {name_a} and {name_b} tokenizers have "
                            f"different weights ({name}); collaborative "
                            "decoding needs both models trained on one VQVAE")
