"""The 50k-sample evaluation run: sharded, chunked, resumable.

Samples go to `OUT.parts/` one chunk (one device-wide batch) per file,
each written under a temporary name and renamed, so an interrupted run
loses at most the chunk in flight and re-running the same command resumes.
A `meta.json` beside the chunks refuses to resume with other settings. When
every chunk exists they are joined into the ADM evaluation format (`arr_0`,
uint8 (N, H, W, 3)), written atomically, and the parts are removed.

Sample i always has class classes[i // per_class] and the per-token keys of global
index i, so the result does not depend on the batch size or device count.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from var_jax.sampling import images as image_io


def _parts_dir(out: pathlib.Path) -> pathlib.Path:
  return out.with_name(out.name + ".parts")


def _check_meta(parts: pathlib.Path, meta: dict) -> None:
  path = parts / "meta.json"
  if path.exists():
    old = json.loads(path.read_text())
    if old != meta:
      diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
      from var_jax.errors import UserError
      raise UserError(f"{parts} holds an interrupted run with other settings "
                      f"({', '.join(diff)}); delete it or use the same flags")
  else:
    parts.mkdir(parents=True, exist_ok=True)
    tmp = parts / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, sort_keys=True))
    tmp.replace(path)


def _shard(sampler, batch: int):
  """Replicates the weights over local devices; returns the batch sharding."""
  devices = jax.local_devices()
  if batch % len(devices):
    from var_jax.errors import UserError
    raise UserError(f"--batch {batch} must be a multiple of the "
                    f"{len(devices)} local devices")
  mesh = Mesh(np.asarray(devices), ("data",))
  rep = NamedSharding(mesh, P())
  sampler.var_state = jax.device_put(sampler.var_state, rep)
  sampler.vae_state = jax.device_put(sampler.vae_state, rep)
  return NamedSharding(mesh, P("data"))


def sample_many(sampler, classes, per_class: int, batch: int,
                seed: int, out, meta: dict) -> int:
  """Runs (or resumes) the whole job; returns the number of samples.

  Args:
    sampler: a `Sampler`; its options apply.
    classes: the class ids, `per_class` samples each, in this order.
    per_class, batch, seed: as the CLI flags.
    out: the final .npz path.
    meta: the settings that must match when resuming.
  """
  from tqdm import tqdm
  out = pathlib.Path(out)
  labels = np.repeat(np.asarray(classes, np.int32), per_class)
  total = len(labels)
  parts = _parts_dir(out)
  _check_meta(parts, dict(meta, total=total))
  n_chunks = -(-total // batch)
  done = {int(p.stem.split("_")[1]) for p in parts.glob("chunk_*.npz")}
  todo = [c for c in range(n_chunks) if c not in done]
  sharding = _shard(sampler, batch) if todo else None
  bar = tqdm(total=total, initial=min(len(done) * batch, total), unit="img",
             dynamic_ncols=True)
  for c in todo:
    start = c * batch
    # The last chunk is padded to the full batch (one compiled shape) and
    # the padding dropped.
    ids = np.arange(start, start + batch, dtype=np.int32)
    lab = labels[np.minimum(ids, total - 1)]
    _, imgs, _, _ = sampler.run_arrays(
        jax.device_put(lab, sharding), seed, jax.device_put(ids, sharding))
    n = min(batch, total - start)
    image_io.save_npz(parts / f"chunk_{c:06d}.npz",
                      arr_0=image_io.to_uint8(np.asarray(imgs)[:n]),
                      labels=lab[:n])
    bar.update(n)
  bar.close()
  arr = np.concatenate([np.load(parts / f"chunk_{c:06d}.npz")["arr_0"]
                        for c in range(n_chunks)])
  image_io.save_npz(out, arr_0=arr)
  shutil.rmtree(parts)
  return len(arr)
