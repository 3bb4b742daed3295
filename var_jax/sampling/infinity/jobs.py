"""What `var-jax t2i` does: load an Infinity directory, encode the prompts,
draw, decode."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from var_jax.convert.infinity import directory
from var_jax.data.text import TextTokenizer
from var_jax.models.infinity import schedules
from var_jax.progress import progress_bar
from var_jax.sampling.infinity.sampler import InfinityOptions, InfinitySampler


def text_to_image(ckpt, prompts: list[str], opts: InfinityOptions, *,
                  seed: int, resolution: int, ratio: float,
                  negative: str | None = None) -> np.ndarray:
  """Images (B, H, W, 3) in [0, 1], one per prompt.

  Raises:
    UserError, CheckpointError, DataError: bad prompts or options, a
      directory that is not an Infinity model (all before any drawing).
  """
  models = directory.load(ckpt)
  tok = TextTokenizer.from_path(models.tokenizer_file,
                                models.text_encoder.cfg.max_length)
  ids, mask = tok.encode(prompts)
  grids = schedules.schedule(ratio, resolution)
  null = null_mask = None
  if negative is not None:
    nid, nmask = tok.encode([negative] * len(prompts))
  # Every real token of every prompt (and the negative one) fits in the
  # first `t` positions; padding past them changes no real token's state.
  t = int(max(mask.sum(1).max(), 0 if negative is None else nmask.sum(1).max()))
  text = models.text_encoder(jnp.asarray(ids[:, :t]), jnp.asarray(mask[:, :t]))
  if negative is not None:
    null_mask = nmask[:, :t]
    null = models.text_encoder(jnp.asarray(nid[:, :t]), jnp.asarray(null_mask))
  sampler = InfinitySampler(models.transformer, models.tokenizer, opts)
  out = []
  report = progress_bar(len(prompts), unit="img", desc="t2i")
  for i in range(len(prompts)):
    one = sampler(text[i:i + 1], mask[i:i + 1, :t], seed=seed, grids=grids,
                  ratio=ratio, sample_ids=[i],
                  null_text_BTc=None if null is None else null[i:i + 1],
                  null_mask_BT=None if null is None else null_mask[i:i + 1])
    out.append(np.asarray(one.images_BHWC[0]))
    report.update(1)
  report.close()
  return np.stack(out)
