"""Deterministic, resumable, process-sharded training batches.

Order: epoch e visits a permutation of the dataset drawn from (seed, e); step s
of the infinite stream is the s-th `global_batch` slice of those epochs
(remainders dropped, so steps_per_epoch = N // global_batch). Process p takes
the p-th contiguous `local_batch` slice of each global batch. Augmentation is
seeded by (seed, global example position), so the stream is a pure function of
(seed, step): threads, process count and restarts cannot change it.

Prefetching uses grain: a MapDataset over local positions, read ahead by a
thread pool (PIL releases the GIL while decoding/resizing), batched, then
stacked one batch ahead by a background thread.
"""

from __future__ import annotations

import logging
import os
import threading

import grain
import numpy as np

from var_jax.data.sources import AugConfig, CorruptImageError, DataError
from var_jax.data.sources import open_source

log = logging.getLogger(__name__)

_PERM_SALT, _AUG_SALT = 0, 1
# Consecutive undecodable examples tolerated before assuming a broken dataset.
_MAX_CONSECUTIVE_CORRUPT = 64


class SplitTooSmallError(DataError):
  """A split with fewer examples than one global batch.

  Attributes: spec, split, where (the folder the split was read from, or
  None), examples, batch; callers that know which setting chose the batch
  name it (see `training.run.open_loader`).
  """

  def __init__(self, spec: str, split: str, where, examples: int,
               batch: int):
    self.spec, self.split, self.where = spec, split, where
    self.examples, self.batch = examples, batch
    at = f" ({where})" if where is not None else ""
    super().__init__(f"{spec!r} split {split!r}{at} has {examples} examples, "
                     f"fewer than global_batch={batch}")


class SkipCounter:
  """The one policy for undecodable images, shared by training and tokenize.

  An example whose image cannot be decoded is skipped, never replaced by a
  made-up one, and counted; the first skip and every `log_every`-th are
  logged with the file and the reason. Training fills the batch slot with
  the next example in dataset order (with that example's own label, so
  shapes and resume stay deterministic); `tokenize` just leaves it out.
  Thread-safe.
  """

  def __init__(self, describe, log_every: int = 100):
    self._describe = describe
    self._log_every = max(1, log_every)
    self._lock = threading.Lock()
    self.count = 0
    self.indices: set[int] = set()
    self.first: str | None = None

  def add(self, index: int, err: Exception) -> None:
    where = self._describe(index)
    with self._lock:
      self.count += 1
      self.indices.add(index)
      n = self.count
      if self.first is None:
        self.first = f"{where} ({err})"
    if n == 1 or n % self._log_every == 0:
      log.warning("skipped undecodable image %s (%s); %d skipped so far",
                  where, err, n)

  def summary(self) -> str | None:
    """One line for the end of a run, or None when nothing was skipped."""
    with self._lock:
      if not self.count:
        return None
      return (f"skipped {len(self.indices)} undecodable image(s), first: "
              f"{self.first}")


class Loader:
  """Iterator of {'images': f32 (B, H, W, 3) in [-1, 1], 'labels': i32 (B,)}.

  A token cache yields 'tokens' i32 (B, L) in place of 'images'.

  Attributes:
    num_classes: number of labels of the source.
    num_examples: examples in the split (before sharding).
    steps_per_epoch: N // global_batch.
    global_batch, local_batch, start_step: as configured.
    step: the global step of the next batch to be returned.
  """

  def __init__(self, source, *, seed: int, global_batch: int, local_batch: int,
               process_index: int, start_step: int, num_epochs: int | None,
               shuffle: bool, num_workers: int, log_every: int):
    self.source = source
    self.num_classes = int(source.num_classes)
    self.num_examples = len(source)
    self.yields_tokens = isinstance(getattr(source, "tokens_NL", None),
                                    np.ndarray)
    self.global_batch, self.local_batch = global_batch, local_batch
    self.steps_per_epoch = self.num_examples // global_batch
    self.start_step = self.step = start_step
    self._seed, self._shuffle = seed, shuffle
    self._process_index = process_index
    self._lock = threading.Lock()
    self.skips = SkipCounter(source.describe, log_every)
    self._perm_cache: dict[int, np.ndarray] = {}

    if num_epochs is None:
      # "Infinite": grain needs a finite length below sys.maxsize.
      n_local = 2**62 // local_batch * local_batch
    else:
      stop_step = num_epochs * self.steps_per_epoch
      n_local = max(0, stop_step - start_step) * local_batch
    ds = grain.MapDataset.range(n_local).map(self._load)
    threads = max(0, num_workers)
    opts = grain.ReadOptions(
        num_threads=threads,
        prefetch_buffer_size=2 * local_batch if threads else 0)
    ds = ds.to_iter_dataset(opts).batch(
        local_batch, drop_remainder=True, batch_fn=_stack)
    if threads:
      # Stack the next batch while the caller is busy with this one.
      ds = grain.experimental.ThreadPrefetchIterDataset(
          ds, prefetch_buffer_size=2)
    self._it = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self.step += 1
    return batch

  def stats(self) -> dict[str, int]:
    """Corrupt-image counters (include examples prefetched but not yet used)."""
    return {"corrupt_skipped": self.skips.count,
            "corrupt_unique": len(self.skips.indices)}

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def global_indices(self, step: int) -> np.ndarray:
    """Dataset indices of the whole global batch at `step` (before skips)."""
    epoch, within = divmod(step, self.steps_per_epoch)
    start = within * self.global_batch
    return self._perm(epoch)[start:start + self.global_batch]

  def _perm(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._perm_cache.get(epoch)
      if perm is None:
        if self._shuffle:
          rng = np.random.default_rng([self._seed, _PERM_SALT, epoch])
          perm = rng.permutation(self.num_examples)
        else:
          perm = np.arange(self.num_examples)
        # Threads straddle at most an epoch boundary: keep two epochs.
        self._perm_cache = {k: v for k, v in self._perm_cache.items()
                            if k >= epoch - 1}
        self._perm_cache[epoch] = perm
      return perm

  def _load(self, k: int):
    """The k-th example of this process's stream (k counts from start_step)."""
    step, j = divmod(k, self.local_batch)
    step += self.start_step
    offset = self._process_index * self.local_batch + j
    pos = step * self.global_batch + offset
    index = int(self.global_indices(step)[offset])
    rng = np.random.default_rng([self._seed, _AUG_SALT, pos])
    for _ in range(_MAX_CONSECUTIVE_CORRUPT):
      try:
        return self.source.example(index, rng)
      except CorruptImageError as e:
        self.skips.add(index, e)
        # The next example (with its own label) fills the slot: batch shapes
        # and the resume/shard identity of the stream stay deterministic.
        index = (index + 1) % self.num_examples
    raise DataError(f"{_MAX_CONSECUTIVE_CORRUPT} consecutive corrupt images "
                    f"ending at {self.source.describe(index)}")


def _stack(examples) -> dict[str, np.ndarray]:
  x = np.stack([x for x, _ in examples])
  labels_B = np.asarray([label for _, label in examples], np.int32)
  # Token caches yield (L,) ids per example, image sources (H, W, 3).
  return {"tokens" if x.ndim == 2 else "images": x, "labels": labels_B}


def _check_numbers(*, resolution, mid_reso, max_shift, num_workers, num_epochs,
                   log_every) -> None:
  """Out-of-domain numbers are refused by name, never clamped silently."""
  def bad(name, value, want):
    raise DataError(f"{name} must be {want}, got {value!r}")
  def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
  if not is_int(resolution) or resolution < 1:
    bad("resolution", resolution, "an integer >= 1")
  if not (isinstance(mid_reso, (int, float, np.floating))
          and np.isfinite(mid_reso) and mid_reso >= 1.0):
    bad("mid_reso", mid_reso, "a finite number >= 1 (the crop must fit)")
  if not is_int(max_shift) or not 0 <= max_shift < resolution:
    bad("max_shift", max_shift, f"an integer in [0, {resolution})")
  if num_workers is not None and (not is_int(num_workers) or num_workers < 0):
    bad("num_workers", num_workers, "an integer >= 0")
  if num_epochs is not None and (not is_int(num_epochs) or num_epochs < 1):
    bad("num_epochs", num_epochs, "None or an integer >= 1")
  if not is_int(log_every) or log_every < 1:
    bad("log_every", log_every, "an integer >= 1")


def make_loader(spec: str, *, split: str, resolution: int, global_batch: int,
                seed: int, hflip: bool = False, process_index: int = 0,
                process_count: int = 1, start_step: int = 0,
                num_workers: int | None = None, data_dir: str | None = None,
                manual_dir: str | None = None, shuffle: bool = True,
                num_epochs: int | None = None, mid_reso: float = 1.125,
                max_shift: int = 0, log_every: int = 100) -> Loader:
  """Builds the batch iterator for `spec` (folder:PATH, tfds:NAME, digits).

  Args:
    spec: data source, see `sources.open_source`.
    split: 'train' uses random crop (+ hflip); any other split center-crops.
    resolution: output side length.
    global_batch: batch over all processes; must divide by process_count.
    seed: non-negative; fixes order and augmentation.
    hflip: random horizontal flip for train splits.
    process_index, process_count: this process's slice of each global batch.
    start_step: first global step to yield (resume).
    num_workers: decode threads; 0 reads synchronously; None = min(32, cpus).
    data_dir, manual_dir: TFDS data and manual-download directories.
    shuffle: epoch-wise permutation; False keeps dataset order.
    num_epochs: stop after this many epochs; None repeats forever.
    mid_reso: shorter side before cropping is round(mid_reso * resolution).
    max_shift: digits only, random translation in pixels for train.
    log_every: log corrupt-image skips once per this many.

  Returns:
    A `Loader`.

  Raises:
    DataError: on any configuration or data-layout problem.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"bad process_index={process_index} for "
                    f"process_count={process_count}")
  if global_batch < 1 or global_batch % process_count:
    raise DataError(f"global_batch={global_batch} is not divisible by "
                    f"process_count={process_count}")
  if seed < 0 or start_step < 0:
    raise DataError(f"seed ({seed}) and start_step ({start_step}) must be >= 0")
  _check_numbers(resolution=resolution, mid_reso=mid_reso, max_shift=max_shift,
                 num_workers=num_workers, num_epochs=num_epochs,
                 log_every=log_every)
  if num_workers is None:
    num_workers = min(32, os.cpu_count() or 1)
  aug = AugConfig(resolution=resolution, train=split.startswith("train"),
                  hflip=hflip, mid_reso=mid_reso, max_shift=max_shift)
  source = open_source(spec, split=split, aug=aug, data_dir=data_dir,
                       manual_dir=manual_dir)
  if len(source) == 0:
    raise DataError(f"no images in {spec!r} split {split!r}")
  if len(source) < global_batch:
    raise SplitTooSmallError(spec, split, getattr(source, "root", None),
                             len(source), global_batch)
  return Loader(source, seed=seed, global_batch=global_batch,
                local_batch=global_batch // process_count,
                process_index=process_index, start_step=start_step,
                num_epochs=num_epochs, shuffle=shuffle,
                num_workers=num_workers, log_every=max(1, log_every))
