"""The 50k-sample evaluation run: sharded, chunked, resumable.

Samples go to `OUT.parts/` one chunk (one device-wide batch) per file,
each written under a temporary name and renamed, so an interrupted run
loses at most the chunk in flight and re-running the same command resumes.
A `meta.json` beside the chunks refuses to resume with other settings. When
every chunk exists they are joined into the ADM evaluation format (`arr_0`,
uint8 (N, H, W, 3)), written atomically, and the parts are removed.

Sample i always has class classes[i // per_class] and the per-token keys of
global index i, so the result does not depend on the batch size or device
count.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from var_jax import io
from var_jax.errors import UserError
from var_jax.sampling import images as image_io
from var_jax.sampling.var.sampler import check_seed


def _parts_dir(out):
  return out.parent / (out.name + ".parts")


def _check_meta(parts, meta: dict) -> None:
  """Refuses to resume a parts directory written with other settings."""
  path = parts / "meta.json"
  if path.exists():
    old = json.loads(path.read_text())
    if old != meta:
      diff = sorted(k for k in set(old) | set(meta)
                    if old.get(k) != meta.get(k))
      raise UserError(f"{parts} holds an interrupted run with other settings "
                      f"({', '.join(diff)}); delete it or use the same flags")


def _write_meta(parts, meta: dict) -> None:
  if not (parts / "meta.json").exists():
    parts.mkdir(parents=True, exist_ok=True)
    io.write_text(parts / "meta.json", json.dumps(meta, sort_keys=True))


def check_devices(batch: int) -> int:
  """The local device count, which `batch` must be a multiple of.

  Raises:
    UserError: batch < 1 or not a multiple of the local device count.
  """
  n = len(jax.local_devices())
  if batch < 1 or batch % n:
    raise UserError(f"--batch {batch} must be a positive multiple of the "
                    f"{n} local devices")
  return n


def _shard(sampler):
  """Replicates the weights over local devices; returns the batch sharding."""
  mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
  sampler.device_put(NamedSharding(mesh, P()))
  return NamedSharding(mesh, P("data"))


def sample_many(sampler, classes, per_class: int, batch: int,
                seed: int, out, meta: dict, *, allow_null: bool = False) -> int:
  """Runs (or resumes) the whole job; returns the number of samples.

  Everything is checked before the first file is written.

  Args:
    sampler: a `Sampler`; its options apply.
    classes: the class ids, `per_class` samples each, in this order.
    per_class, batch, seed: as the CLI flags (batch: over all local
      devices).
    out: the final .npz path (local or `gs://`).
    meta: the settings that must match when resuming.
    allow_null: accept the null class (unconditional samples) in `classes`.

  Raises:
    UserError: bad classes, per_class, batch or seed, or a parts directory
      of a run with other settings.
  """
  from tqdm import tqdm
  out = io.as_path(out)
  classes = sampler.check_labels(classes, allow_null=allow_null)
  if per_class < 1:
    raise UserError(f"per_class must be >= 1, got {per_class}")
  check_devices(batch)
  key = check_seed(seed)
  labels = np.repeat(classes, per_class)
  total = len(labels)
  parts = _parts_dir(out)
  meta = dict(meta, total=total)
  _check_meta(parts, meta)
  _write_meta(parts, meta)
  n_chunks = -(-total // batch)
  done = {int(p.stem.split("_")[1]) for p in parts.glob("chunk_*.npz")}
  todo = [c for c in range(n_chunks) if c not in done]
  sharding = _shard(sampler) if todo else None
  bar = tqdm(total=total, initial=min(len(done) * batch, total), unit="img",
             dynamic_ncols=True)
  for c in todo:
    start = c * batch
    # The last chunk is padded to the full batch (one compiled shape) and
    # the padding dropped.
    ids = np.arange(start, start + batch, dtype=np.int32)
    lab = labels[np.minimum(ids, total - 1)]
    _, imgs, _ = sampler.run_arrays(
        jax.device_put(lab, sharding), key, jax.device_put(ids, sharding))
    n = min(batch, total - start)
    image_io.save_npz(parts / f"chunk_{c:06d}.npz",
                      arr_0=image_io.to_uint8(np.asarray(imgs)[:n]),
                      labels=lab[:n])
    bar.update(n)
  bar.close()
  arrs = []
  for c in range(n_chunks):
    with (parts / f"chunk_{c:06d}.npz").open("rb") as fh:
      arrs.append(np.load(fh)["arr_0"])
  arr = np.concatenate(arrs)
  image_io.save_npz(out, arr_0=arr)
  parts.rmtree()
  return len(arr)
