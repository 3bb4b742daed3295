"""Pre-tokenizing a dataset for VAR training (`var-jax tokenize`).

A token cache holds exactly the decodable images of the split, each once,
in the source's order, each with its own label. Undecodable images are
skipped and counted under the same policy as the training loader
(`data.loader.SkipCounter`), never replaced by a neighbour.

The cache also records what it was made from: `tokenizer`, the fingerprint
of the tokenizer's weights (`fingerprints.tree_fingerprint`; training
refuses a cache made with another tokenizer than its own), and `source`, a
JSON description of the images (spec, split, count, classes and, for image
folders, the size and modification time of every file).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys

import numpy as np

from var_jax.errors import DataError, UserError


def tokenizer_fingerprint(vae) -> str:
  """Fingerprint of a tokenizer's weights: an `nnx` VQVAE, or the pure dict
  of its state (as training restores it); both give the same string."""
  from flax import nnx

  from var_jax.fingerprints import tree_fingerprint
  if isinstance(vae, nnx.Module):
    vae = nnx.to_pure_dict(nnx.state(vae))
  return tree_fingerprint(vae)


def source_record(spec: str, split: str, source) -> dict:
  """What a token cache was made from (stored as its `source`)."""
  out = {"data": spec, "split": split, "count": len(source),
         "num_classes": int(source.num_classes)}
  if getattr(source, "classes", None) is not None:  # Folder data.
    from var_jax.fingerprints import files_fingerprint
    out["classes"] = list(source.classes)
    out["files"] = files_fingerprint(source.paths, root=source.root)
  return out


def _log_stderr(msg: str) -> None:
  print(msg, file=sys.stderr)


def tokenize_dataset(ckpt, spec: str, split: str, out, *, batch: int = 64,
                     patch_nums=None, num_workers: int | None = None,
                     log=_log_stderr) -> int:
  """Encodes every decodable example of `spec`/`split` (center crop) to `out`.

  Args:
    ckpt: model directory or model name (`checkpoint.model_dir`) holding
      the tokenizer.
    spec: `folder:PATH`, `tfds:NAME` or `digits` (not a token cache).
    split: data split ('train', 'val', ...).
    out: output `.npz` (local or `gs://`), written atomically.
    batch: images per tokenizer call, >= 1.
    patch_nums: scale list (default: the tokenizer's); must end with the
      tokenizer's latent side.
    num_workers: decode threads (default: min(8, cpus)).
    log: where the skipped-images summary line goes (default: stderr).

  Returns:
    N, the number of token sequences written: `tokens` int32 (N, L),
    `labels` int32 (N,), `patch_nums`, `num_classes`, `vocab_size`,
    `skipped` (the number of undecodable images left out), `tokenizer` and
    `source` (see above).

  Raises:
    UserError: bad batch, scales or output path (before anything is read).
    DataError: bad source, or no decodable image at all.
    WriteError: the output could not be written (nothing is left behind).
  """
  from var_jax import checkpoint
  from var_jax.data.loader import SkipCounter
  from var_jax.data.sources import AugConfig, CorruptImageError, open_source
  from var_jax.io import check_output_file, save_npz
  from var_jax.models.var.vqvae import jit_tokenizer
  from var_jax.progress import progress_bar

  if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
    raise UserError(f"batch must be an integer >= 1, got {batch!r}")
  if num_workers is not None and num_workers < 0:
    raise UserError(f"num_workers must be >= 0, got {num_workers}")
  out = check_output_file(out, ".npz")
  if spec.startswith("tokens:"):
    raise UserError("--data is already a token cache; tokenize reads images")
  cfg, vae, _ = checkpoint.load_model(ckpt, need_var=False)
  latent = cfg.vae.v_patch_nums[-1]
  pn = tuple(patch_nums or cfg.vae.v_patch_nums)
  if (not pn or any(p < 1 for p in pn) or list(pn) != sorted(set(pn))
      or pn[-1] != latent):
    raise UserError(f"scales must increase strictly from >= 1 and end with "
                    f"the tokenizer's latent side {latent}, got {list(pn)}")
  source = open_source(spec, split=split, aug=AugConfig(
      resolution=cfg.vae.resolution, train=False))
  skips = SkipCounter(source.describe)
  rng = np.random.default_rng(0)  # Center crop: nothing random is drawn.

  def load(i):
    try:
      return source.example(i, rng)
    except CorruptImageError as e:
      skips.add(i, e)
      return None

  encode = jit_tokenizer(vae, pn)

  def encode_batch(examples):
    x = np.stack([x for x, _ in examples])
    n = len(x)
    if n < batch:  # Pad to the compiled batch size; padding is dropped.
      x = np.concatenate([x, np.repeat(x[-1:], batch - n, 0)])
    idx = np.concatenate([np.asarray(i) for i in encode(x)], 1)[:n]
    return idx.astype(np.int32), np.asarray([y for _, y in examples], np.int32)

  n = len(source)
  toks, labels, pending = [], [], []
  workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool, \
      progress_bar(n, unit="img", desc="tokenize") as bar:
    for start in range(0, n, batch):
      for ex in pool.map(load, range(start, min(start + batch, n))):
        bar.update(1)
        if ex is not None:
          pending.append(ex)
      while len(pending) >= batch:
        t, y = encode_batch(pending[:batch])
        toks.append(t)
        labels.append(y)
        del pending[:batch]
    if pending:
      t, y = encode_batch(pending)
      toks.append(t)
      labels.append(y)
  if not toks:
    raise DataError(f"no decodable image in {spec!r} split {split!r} "
                    f"({skips.count} skipped); nothing written")
  tokens_NL = np.concatenate(toks)
  save_npz(out, tokens=tokens_NL, labels=np.concatenate(labels),
           patch_nums=np.asarray(pn, np.int32),
           num_classes=np.int32(source.num_classes),
           vocab_size=np.int32(cfg.vae.vocab_size),
           skipped=np.int32(len(skips.indices)),
           tokenizer=np.asarray(tokenizer_fingerprint(vae)),
           source=np.asarray(json.dumps(source_record(spec, split, source),
                                        sort_keys=True)))
  summary = skips.summary()
  if summary:
    log(f"{summary}; the cache holds the other {len(tokens_NL)}")
  return len(tokens_NL)
