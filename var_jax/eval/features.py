"""Inception features of an image set: jitted, sharded, streamed, cached.

One compiled program maps a uint8 batch (B, H, W, 3) to the three features
the ADM evaluator uses (`pool` 2048, `spatial` 2023, `logits_unbiased`
1008). The weights are replicated over the local devices and the batch is
split along the mesh axis `data`. On several hosts each process takes a
contiguous share of the images and the features are gathered at the end.
Reading runs in a background thread one batch ahead of the device; the last
batch is padded to the full size (one compiled shape) and the padding
dropped. Process 0 reports progress in images/s on stderr
(`var_jax.progress`: a live bar on a terminal, whole lines in a log file).
"""

from __future__ import annotations

import queue
import threading

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from var_jax.errors import DataError, UserError
from var_jax.fingerprints import tree_fingerprint
from var_jax.models.inception import FEATURE_DIMS

ADM_FEATURES = ("pool", "spatial", "logits_unbiased")
# Images per device step on the CPU: a 299x299 batch of 16 keeps the working
# set near 1 GB (64 at once peaked at 2.9 GB resident) at the same speed.
CPU_CHUNK = 16
CACHE_VERSION = 2  # 2: `content`, the fingerprint of the images.


def weights_fingerprint(model) -> str:
  """A short hash of every weight, to tie a feature cache to its network."""
  return tree_fingerprint(nnx.to_pure_dict(nnx.state(model)))


class FeatureExtractor:
  """Runs the Inception over image sources on all local devices.

  Args:
    model: a `var_jax.models.inception.InceptionV3` with its weights.
    batch: images per step over all local devices (a multiple of their
      count).
    names: which features to return.
    devices: the devices to shard over (default `jax.local_devices()`).
    chunk: images each device runs at a time (a `lax.map` over its share;
      default 16 on the CPU, the whole share elsewhere).

  Raises:
    UserError: `batch` is not a positive multiple of the device count.
  """

  def __init__(self, model, batch: int = 64, names=ADM_FEATURES,
               devices=None, chunk: int | None = None):
    devices = list(devices or jax.local_devices())
    if batch <= 0 or batch % len(devices):
      raise UserError(f"--batch {batch} must be a positive multiple of the "
                      f"{len(devices)} local devices")
    self.batch = batch
    self.names = tuple(names)
    self.fingerprint = weights_fingerprint(model)
    per_device = batch // len(devices)
    if chunk is None:
      chunk = CPU_CHUNK if devices[0].platform == "cpu" else per_device
    # The largest divisor of the per-device batch not above `chunk`.
    self.chunk = max(d for d in range(1, min(chunk, per_device) + 1)
                     if per_device % d == 0)
    mesh = Mesh(np.asarray(devices), ("data",))
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, rep)
    self._data = data
    names, m = self.names, self.chunk

    def local(state, x_bHWC):
      # One device's share, `m` images at a time: the activations of a
      # 299x299 batch are what bounds memory, not the weights.
      b = x_bHWC.shape[0]
      xs = x_bHWC.reshape((b // m, m) + x_bHWC.shape[1:])

      def one(x):
        feats = nnx.merge(graphdef, state)(x)
        return {k: feats[k] for k in names}

      out = jax.lax.map(one, xs)
      return {k: v.reshape((b,) + v.shape[2:]) for k, v in out.items()}

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")),
                            out_specs=P("data"))
    self._run = jax.jit(sharded, in_shardings=(rep, data), out_shardings=data)

  def step(self, x_BHWC: np.ndarray) -> dict:
    """Dispatches one full batch (uint8 (batch, H, W, 3)); returns the
    features as (sharded, maybe unfinished) device arrays."""
    return self._run(self._state, jax.device_put(x_BHWC, self._data))

  def _share(self, n: int) -> tuple[int, int, int]:
    """This process's [start, stop) and the padded per-process count."""
    procs, rank = jax.process_count(), jax.process_index()
    per = -(-n // procs)
    per = -(-per // self.batch) * self.batch if procs > 1 else per
    start = min(rank * per, n)
    return start, min(start + per, n), per

  def __call__(self, source, desc: str = "features",
               progress: bool = True) -> dict[str, np.ndarray]:
    """Features of every image of `source` ({name: float32 (N, D)}).

    Args:
      source: the images, read in batches (`source.batches`).
      desc: the label of the progress reports.
      progress: report progress on stderr (process 0 only).

    Raises:
      DataError: the source failed while being read.
    """
    from var_jax.progress import progress_bar
    n = source.n
    start, stop, per = self._share(n)
    out = {k: np.zeros((max(per, stop - start), FEATURE_DIMS[k]), np.float32)
           for k in self.names}
    bar = progress_bar(stop - start, unit="img", desc=desc,
                       disable=not progress or jax.process_index() != 0)
    pending = None  # (offset, count, device result) of the batch in flight.
    done = 0
    for x in _prefetch(source.batches(start, stop, self.batch)):
      count = len(x)
      if count < self.batch:
        x = np.concatenate([x, np.zeros((self.batch - count,) + x.shape[1:],
                                        x.dtype)])
      result = self.step(x)
      if pending is not None:
        self._store(out, pending, bar)
      pending = (done, count, result)
      done += count
    if pending is not None:
      self._store(out, pending, bar)
    bar.close()
    if jax.process_count() > 1:
      out = _gather(out, n, per)
    return {k: v[:n] for k, v in out.items()}

  @staticmethod
  def _store(out, pending, bar):
    offset, count, result = pending
    for k, v in result.items():
      out[k][offset:offset + count] = np.asarray(v)[:count]
    bar.update(count)


def _prefetch(iterator, depth: int = 2):
  """Runs `iterator` in a thread, `depth` items ahead; re-raises its errors."""
  q: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()
  end = object()

  def work():
    try:
      for item in iterator:
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      q.put(end)
    except BaseException as e:  # noqa: BLE001  (handed to the consumer)
      q.put(e)

  t = threading.Thread(target=work, daemon=True)
  t.start()
  try:
    while True:
      item = q.get()
      if item is end:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


def _gather(out, n, per):
  from jax.experimental import multihost_utils
  gathered = {}
  for k, v in out.items():
    allv = np.asarray(multihost_utils.process_allgather(v))  # (procs, per, D)
    gathered[k] = allv.reshape(-1, v.shape[1])[:n]
  return gathered


# ---------------------------------------------------------------------------
# Feature caches: {pool, spatial, logits_unbiased} + what they were made from.


def cache_meta(source, fingerprint: str) -> dict:
  """What a feature cache was made from: the network's weights
  (`fingerprint`) and the images (count, shape and `source.fingerprint()`:
  a content hash of an npz, size and modification time of folder files)."""
  return {"version": CACHE_VERSION, "weights": fingerprint, "n": source.n,
          "image_shape": list(source.image_shape),
          "content": source.fingerprint()}


def read_cache(path, meta: dict) -> dict[str, np.ndarray] | None:
  """The cached features at `path`, or None when there is no such file.

  Raises:
    DataError: the file exists but was made from other images or weights,
      or is unreadable.
  """
  import json

  from var_jax.io import as_path
  path = as_path(path)
  if not path.exists():
    return None
  try:
    with path.open("rb") as fh, np.load(fh, allow_pickle=False) as z:
      stored = json.loads(str(z["meta"]))
      feats = {k: z[k] for k in ADM_FEATURES}
  except (OSError, ValueError, KeyError, EOFError) as e:
    raise DataError(f"feature cache {path}: unreadable ({type(e).__name__}: "
                    f"{e}); delete it to recompute") from None
  if stored != meta:
    diff = sorted(k for k in set(stored) | set(meta)
                  if stored.get(k) != meta.get(k))
    what = {"content": "image content", "weights": "Inception weights",
            "n": "image count", "image_shape": "image size",
            "version": "cache format"}
    raise DataError(f"feature cache {path} was made from other images or "
                    f"Inception weights ({', '.join(what.get(k, k) for k in diff)}"
                    " differ); delete it or pass another cache path")
  for k, v in feats.items():
    if v.shape != (meta["n"], FEATURE_DIMS[k]):
      raise DataError(f"feature cache {path}: {k} has shape {v.shape}, "
                      f"expected {(meta['n'], FEATURE_DIMS[k])}")
  return feats


def write_cache(path, feats: dict, meta: dict) -> None:
  import json

  from var_jax.io import save_npz
  save_npz(path, meta=np.asarray(json.dumps(meta, sort_keys=True)),
           **{k: np.asarray(feats[k], np.float32) for k in ADM_FEATURES})
