"""Pre-tokenizing a dataset for VAR training (`var-jax tokenize`)."""

from __future__ import annotations

import os

import numpy as np


def tokenize_dataset(ckpt, spec: str, split: str, out, *, batch: int = 64,
                     patch_nums=None) -> int:
  """Encodes every example of `spec`/`split` (center crop) into `out`.

  Writes `tokens` int32 (N, L), `labels` int32 (N,), `patch_nums` and
  `num_classes` through a temporary file; returns N.
  """
  from tqdm import tqdm

  from var_jax import checkpoint
  from var_jax.data.loader import Loader
  from var_jax.data.sources import AugConfig, open_source
  from var_jax.models.vqvae import jit_tokenizer
  from var_jax.io import save_npz

  cfg, vae, _ = checkpoint.load_model(ckpt, need_var=False)
  pn = tuple(patch_nums or cfg.vae.v_patch_nums)
  if pn[-1] != cfg.vae.v_patch_nums[-1]:
    from var_jax.errors import UserError
    raise UserError(f"the last scale must be the tokenizer's latent side "
                    f"{cfg.vae.v_patch_nums[-1]}, got {pn}")
  source = open_source(spec, split=split, aug=AugConfig(
      resolution=cfg.vae.resolution, train=False))
  n = len(source)
  b = min(batch, n)
  loader = Loader(source, seed=0, global_batch=b, local_batch=b,
                  process_index=0, start_step=0, num_epochs=1, shuffle=False,
                  num_workers=min(8, os.cpu_count() or 1), log_every=100)
  encode = jit_tokenizer(vae, pn)
  toks, labels = [], []
  with loader, tqdm(total=n, unit="img", dynamic_ncols=True) as bar:
    for ex in loader:
      toks.append(np.concatenate([np.asarray(i) for i in
                                  encode(ex["images"])], 1))
      labels.append(ex["labels"])
      bar.update(len(ex["labels"]))
    # The loader drops the remainder of the last batch; encode it here.
    rest = range(loader.steps_per_epoch * b, n)
    if len(rest):
      rng = np.random.default_rng(0)
      ex = [source.example(i, rng) for i in rest]
      toks.append(np.concatenate([np.asarray(i) for i in encode(
          np.stack([e[0] for e in ex]))], 1))
      labels.append(np.asarray([e[1] for e in ex], np.int32))
      bar.update(len(ex))
  save_npz(out, tokens=np.concatenate(toks).astype(np.int32),
           labels=np.concatenate(labels).astype(np.int32),
           patch_nums=np.asarray(pn, np.int32),
           num_classes=np.int32(source.num_classes))
  return n
