"""The 50k-sample evaluation run: sharded, chunked, resumable.

Samples go to `OUT.parts/` one chunk (one device-wide batch) per file,
each written under a temporary name and renamed, so an interrupted run
loses at most the chunk in flight and re-running the same command resumes.
A `meta.json` beside the chunks refuses to resume with other settings. When
every chunk exists they are joined into the ADM evaluation format (`arr_0`,
uint8 (N, H, W, 3), plus the settings as JSON text in `meta`), written
atomically, and the parts are removed. Running the same job again finds the
finished file and leaves it alone (`finished`); other settings are refused
unless the caller asks to overwrite.

Sample i always has class classes[i // per_class] and the per-token keys of
global index i, so the result does not depend on the batch size or device
count.

One writer per output: a run holds the lock of `var_jax.locks` on
`OUT.parts/` (`OUT.parts/var-jax.lock`, which holds its process id) from
before it reads the parts directory until the parts are removed; a second
run on the same `--out` is refused naming that pid. Only local paths are
locked (no lock is taken for gs:// outputs). A parts directory that holds
files but no `meta.json` is refused, never adopted.
"""

from __future__ import annotations

import json
import zipfile

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from var_jax import io, locks
from var_jax.errors import UserError
from var_jax.sampling import images as image_io
from var_jax.sampling.var.sampler import check_seed


def _parts_dir(out):
  return out.parent / (out.name + ".parts")


# Settings that do not change a sample (sample i depends on the seed and i
# only), left out of the finished file's record.
_RESULT_FREE = ("batch",)


def _differing(old: dict, new: dict) -> list[str]:
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


# Settings naming the models' contents (`checkpoint.fingerprint`).
_MODEL_KEYS = ("model", "drafter_model")


def check_meta(parts, meta: dict) -> None:
  """Refuses to resume a parts directory (or any resumable output folder)
  written with other settings or other models, or one without its
  meta.json.

  Raises:
    UserError: naming the differing settings.
  """
  path = parts / "meta.json"
  if not path.exists():
    names = sorted(p.name for p in parts.iterdir()) if parts.exists() else []
    others = [n for n in names if n != locks.LOCK_NAME]
    if others:
      raise UserError(f"{parts} holds {len(others)} files but no meta.json: "
                      "not parts this command can resume (their settings "
                      "are unknown); delete it or pass --overwrite")
    return
  try:
    old = json.loads(path.read_text())
  except ValueError:
    old = None
  if not isinstance(old, dict):
    raise UserError(f"{path} is not a settings file; delete {parts} or pass "
                    "--overwrite")
  if old != meta:
    diff = _differing(old, meta)
    models = [k for k in diff if k in _MODEL_KEYS]
    if models:
      raise UserError(
          f"{parts} holds an interrupted run of another model: "
          f"{', '.join(models)} changed since (the model directory "
          f"{meta.get('ckpt')} was replaced); --overwrite starts over")
    raise UserError(f"{parts} holds an interrupted run with other settings "
                    f"({', '.join(diff)}); delete it, use "
                    "the same flags, or --overwrite to start over")


def check_resumable(out, meta: dict, *, overwrite: bool = False) -> None:
  """What `sample_many` would refuse about `out`'s parts, checked early
  (before a model is loaded) and without writing: another process writing
  `out`, and without `overwrite` parts of other settings or models or
  without meta.json.

  Raises:
    UserError: as `sample_many`.
  """
  out = io.as_path(out)
  parts = _parts_dir(out)
  pid = locks.holder_pid(parts)
  if pid is not None:
    raise locks.OutputInUseError(_in_use(out, pid))
  if not overwrite and parts.exists():
    check_meta(parts, json.loads(json.dumps(meta, default=plain_json)))


def _in_use(out, pid: int) -> str:
  """The refusal of a second writer of `out` (pid 0: not known)."""
  shown = f"pid {pid}" if pid > 0 else "another process"
  return (f"{out} is being written by another sample-many ({shown}); "
          "wait for it to finish or stop it")


def _result_meta(meta: dict) -> dict:
  return {k: v for k, v in meta.items() if k not in _RESULT_FREE}


def _stored(out) -> tuple[dict | None, int]:
  """(settings stored in a finished file or None, its sample count), read
  from the npz headers without loading the images."""
  with out.open("rb") as fh, zipfile.ZipFile(fh) as zf:
    names = set(zf.namelist())
    if "arr_0.npy" not in names:
      return None, 0
    with zf.open("arr_0.npy") as arr:
      fmt = np.lib.format
      read = (fmt.read_array_header_1_0 if fmt.read_magic(arr) == (1, 0)
              else fmt.read_array_header_2_0)
      shape = read(arr)[0]
    meta = None
    if "meta.npy" in names:
      with zf.open("meta.npy") as fm:
        meta = json.loads(str(np.load(fm)))
  return meta, int(shape[0]) if shape else 0


def finished(out, meta: dict, *, overwrite: bool = False) -> int | None:
  """The sample count of a finished run at `out` with the settings `meta`.

  Args:
    out: the final .npz path (local or `gs://`).
    meta: the settings, as `sample_many` takes them.
    overwrite: the caller will replace `out`: never refuse, return None.

  Returns:
    The count when `out` holds this job's complete result; None when there
    is no `out` (or `overwrite`).

  Raises:
    UserError: `out` exists but holds another job's samples (other
      settings, named), or a file this command did not write.
  """
  out = io.as_path(out)
  with io.reachable(out, "--out"):
    exists = out.exists()
  if overwrite or not exists:
    return None
  meta = _result_meta(json.loads(json.dumps(meta, default=plain_json)))
  try:
    old, n = _stored(out)
  except (OSError, ValueError, zipfile.BadZipFile):
    old, n = None, 0
  if old is None:
    raise UserError(f"{out} exists and was not written by sample-many (no "
                    "settings stored); --overwrite replaces it")
  if old != meta:
    raise UserError(f"{out} exists with other settings "
                    f"({', '.join(_differing(old, meta))}); --overwrite "
                    "replaces it")
  if n != meta.get("total"):
    raise UserError(f"{out} holds {n} samples, not the {meta.get('total')} "
                    "these settings make; --overwrite replaces it")
  return n


def write_meta(parts, meta: dict) -> None:
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


def replicate_weights(sampler):
  """Replicates a sampler's weights over the local devices (its
  `device_put`); returns the sharding that splits a batch over them."""
  mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
  sampler.device_put(NamedSharding(mesh, P()))
  return NamedSharding(mesh, P("data"))


def plain_json(value):
  """NumPy values as the Python ones JSON stores (`json.dumps`' default)."""
  if isinstance(value, (np.ndarray, np.generic)):
    return value.tolist()
  raise UserError(f"meta values must be JSON values, got {value!r}")


def job_meta(meta: dict, classes, per_class: int) -> dict:
  """`meta` completed with the sample count, as stored (JSON types: tuples
  become lists, NumPy numbers Python ones).

  Raises:
    UserError: a value JSON cannot store.
  """
  meta = dict(meta, total=len(classes) * per_class)
  return json.loads(json.dumps(meta, default=plain_json))


def sample_many(sampler, classes, per_class: int, batch: int,
                seed: int, out, meta: dict, *, allow_null: bool = False,
                overwrite: bool = False) -> int:
  """Runs (or resumes) the whole job; returns the number of samples.

  Everything is checked before the first file is written. A finished `out`
  made with the same settings is left as it is (its count returned).

  Args:
    sampler: a `Sampler`; its options apply.
    classes: the class ids, `per_class` samples each, in this order.
    per_class, batch, seed: as the CLI flags (batch: over all local
      devices).
    out: the final .npz path (local or `gs://`).
    meta: the settings that must match when resuming (JSON values); they
      are stored in the result as `meta`.
    allow_null: accept the null class (unconditional samples) in `classes`.
    overwrite: start over: draw every sample again, replacing a finished
      `out` and discarding the parts of an interrupted run.

  `meta` should name the models' contents (`checkpoint.fingerprint` under
  "model" and, with a drafter, "drafter_model"), so that a model directory
  replaced under the same name is not resumed.

  Raises:
    UserError: bad classes, per_class, batch or seed; another process
      writing `out` (local paths); without `overwrite`, a parts directory
      without meta.json, or a parts directory or a finished `out` of a run
      with other settings or models.
  """
  out = io.as_path(out)
  classes = sampler.check_labels(classes, allow_null=allow_null)
  if per_class < 1:
    raise UserError(f"per_class must be >= 1, got {per_class}")
  check_devices(batch)
  key = check_seed(seed)
  labels = np.repeat(classes, per_class)
  parts = _parts_dir(out)
  meta = job_meta(meta, classes, per_class)
  n = finished(out, meta, overwrite=overwrite)
  if n is not None:
    return n
  # The parts directory the lock creates is removed on release when the run
  # left nothing else in it.
  with locks.DirLock(parts, describe=lambda pid: _in_use(out, pid),
                     shown=out):
    # Another run may have finished `out` while this one waited to start.
    n = finished(out, meta, overwrite=overwrite)
    if n is not None:
      return n
    return _run(sampler, labels, batch, key, out, parts, meta, overwrite)


def _run(sampler, labels, batch, key, out, parts, meta, overwrite) -> int:
  """The job, under the writer lock."""
  from var_jax.progress import progress_bar
  total = len(labels)
  if overwrite and parts.exists():
    for p in parts.iterdir():
      if p.name == locks.LOCK_NAME:
        continue
      if p.is_dir():
        p.rmtree()
      else:
        p.unlink()
  check_meta(parts, meta)
  write_meta(parts, meta)
  n_chunks = -(-total // batch)
  done = {int(p.stem.split("_")[1]) for p in parts.glob("chunk_*.npz")}
  todo = [c for c in range(n_chunks) if c not in done]
  sharding = replicate_weights(sampler) if todo else None
  bar = progress_bar(total, initial=min(len(done) * batch, total), unit="img")
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
  image_io.save_npz(out, arr_0=arr,
                    meta=np.asarray(json.dumps(_result_meta(meta),
                                               sort_keys=True)))
  parts.rmtree()
  return len(arr)
