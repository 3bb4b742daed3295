"""`var-jax eval` as a library call: check everything, extract, score.

The order is the contract: every input (metric names, sample set, reference
set and its precomputed statistics, feature caches) is checked before the
network runs, and nothing is written until the features exist.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from var_jax.errors import DataError, UserError
from var_jax.eval import features as F
from var_jax.eval import inputs, metrics
from var_jax.models.inception import POOL_DIM, SPATIAL_DIM

METRICS = ("is", "fid", "sfid", "precision", "recall")
_ALIASES = {"inception_score": "is", "isc": "is", "pr": "precision,recall",
            "prc": "precision,recall", "all": ",".join(METRICS)}
# Precomputed statistics an ADM reference batch may carry.
_STAT_KEYS = {"pool": ("mu", "sigma", POOL_DIM),
              "spatial": ("mu_s", "sigma_s", SPATIAL_DIM)}


def parse_metrics(spec: str) -> tuple[str, ...]:
  """'fid,is,...' -> names in the canonical order.

  Raises:
    UserError: an unknown name.
  """
  names = set()
  for part in spec.split(","):
    part = part.strip().lower()
    if not part:
      continue
    for p in _ALIASES.get(part, part).split(","):
      if p not in METRICS:
        raise UserError(f"unknown metric {part!r}; choose from "
                        f"{', '.join(METRICS)} (or pr, all)")
      names.add(p)
  if not names:
    raise UserError("--metrics names no metric")
  return tuple(m for m in METRICS if m in names)


@dataclasses.dataclass
class Reference:
  """A reference batch: its images (or None) and precomputed statistics."""

  path: str
  images: object | None
  stats: dict  # 'pool' / 'spatial' -> metrics.FIDStatistics


def open_reference(path) -> Reference:
  """An ADM reference `.npz` (arr_0 and/or mu, sigma, mu_s, sigma_s) or a
  folder of images.

  Raises:
    DataError: unreadable file, statistics of the wrong width or shape, or
      neither images nor statistics.
  """
  from var_jax.io import as_path
  p = as_path(path)
  if p.is_dir() or p.suffix.lower() != ".npz" or not p.exists():
    return Reference(str(p), inputs.open_images(p), {})
  with inputs.open_npz(p) as zf:
    keys = set(inputs.npz_keys(zf))
  stats = {}
  for feat, (mu_key, sigma_key, dim) in _STAT_KEYS.items():
    if mu_key not in keys and sigma_key not in keys:
      continue
    if mu_key not in keys or sigma_key not in keys:
      raise DataError(f"{p}: has {mu_key if mu_key in keys else sigma_key} "
                      f"without {sigma_key if mu_key in keys else mu_key}")
    with p.open("rb") as fh, np.load(fh, allow_pickle=False) as z:
      try:
        mu, sigma = z[mu_key], z[sigma_key]
      except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{p}: cannot read {mu_key}/{sigma_key} ({e})"
                        ) from None
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
      raise DataError(
          f"{p}: precomputed {mu_key} {mu.shape} / {sigma_key} {sigma.shape} "
          f"do not fit the Inception {feat} feature of width {dim} "
          f"(expected ({dim},) / ({dim}, {dim})); they were made with "
          "another network or layer")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
      raise DataError(f"{p}: {mu_key}/{sigma_key} hold non-finite values")
    stats[feat] = metrics.FIDStatistics(mu, sigma)
  images = inputs.NpzImages(p) if inputs.ADM_KEY in keys else None
  if images is None and not stats:
    raise DataError(f"{p}: neither images (arr_0) nor statistics (mu, sigma, "
                    "mu_s, sigma_s)")
  return Reference(str(p), images, stats)


def _needs_ref_features(ref: Reference | None, names) -> list[str]:
  """Which requested metrics need the reference's own features."""
  if ref is None:
    return []
  need = [m for m in names if m in ("precision", "recall")]
  if "fid" in names and "pool" not in ref.stats:
    need.append("fid")
  if "sfid" in names and "spatial" not in ref.stats:
    need.append("sfid")
  return need


@dataclasses.dataclass
class Plan:
  names: tuple[str, ...]
  samples: object
  ref: Reference | None
  ref_needs: list[str]
  sample_cache: str | None
  ref_cache: str | None
  # Metrics left out because no reference was given and none were named
  # (what `--ref` would add); empty otherwise.
  need_ref: tuple[str, ...] = ()


def plan(samples_path, ref_path, metric_spec: str | None, sample_cache=None,
         ref_cache=None) -> Plan:
  """Checks every input without running the network.

  `metric_spec` None means every metric the inputs allow: all of them with a
  reference, the Inception Score alone without one (the others are listed
  in `Plan.need_ref`).

  Raises:
    UserError / DataError: as the checks above; a metric named in
      `metric_spec` that needs a reference when there is none.
  """
  need_ref = ()
  if metric_spec is None and not ref_path:
    names, need_ref = ("is",), tuple(m for m in METRICS if m != "is")
  else:
    names = parse_metrics("all" if metric_spec is None else metric_spec)
  samples = inputs.open_images(samples_path)
  ref = open_reference(ref_path) if ref_path else None
  if ref is None and any(m != "is" for m in names):
    raise UserError(f"--ref is needed for {', '.join(m for m in names if m != 'is')}"
                    " (only the Inception Score works without a reference)")
  needs = _needs_ref_features(ref, names)
  if needs and ref.images is None:
    raise DataError(f"{ref.path} has no images (arr_0), which "
                    f"{', '.join(needs)} need")
  for c in (sample_cache, ref_cache):
    if c and os.path.isdir(os.path.expanduser(str(c))):
      raise UserError(f"feature cache {c} is a directory; give an .npz path")
  _check_counts(names, samples, ref, needs)
  return Plan(names, samples, ref, needs, sample_cache, ref_cache, need_ref)


def _check_counts(names, samples, ref, ref_needs) -> None:
  """Refuses too few images for a requested metric before any work (a
  feature cache would otherwise be written before the metric fails).

  Raises:
    DataError: naming the metric, the set and the count it needs.
  """
  k = metrics.NHOOD
  need = {"is": 1, "fid": 2, "sfid": 2, "precision": k + 1, "recall": k + 1}
  sets = [("sample", samples, names)]
  if ref is not None and ref.images is not None:
    sets.append(("reference", ref.images, ref_needs))
  for what, images, wanted in sets:
    for m in wanted:
      if images.n < need[m]:
        raise DataError(
            f"{_LABELS[m]} needs at least {need[m]} {what} images, "
            f"{images.describe()} has {images.n}")


def _read(cache, source, fingerprint: str):
  """The features of an existing cache made from `source`, else None (the
  content fingerprint is only computed when there is a cache to check)."""
  from var_jax.io import as_path
  if not cache or not as_path(cache).exists():
    return None
  return F.read_cache(cache, F.cache_meta(source, fingerprint))


def _features(extractor, source, cache, desc, progress):
  """(features, seconds, computed?) from the cache or the network."""
  feats = _read(cache, source, extractor.fingerprint)
  if feats is not None:
    return feats, 0.0, False
  t0 = time.perf_counter()
  feats = extractor(source, desc=desc, progress=progress)
  return feats, time.perf_counter() - t0, True


def check_caches(p: Plan, fingerprint: str) -> None:
  """Reads existing caches once so a stale one fails before any work."""
  _read(p.sample_cache, p.samples, fingerprint)
  if p.ref_needs:
    _read(p.ref_cache, p.ref.images, fingerprint)


def run(p: Plan, extractor, progress: bool = True) -> dict:
  """Extracts what the plan needs, writes caches, computes the metrics.

  Returns:
    The result dict (`inception_score`, `fid`, `sfid`, `precision`,
    `recall` as requested, counts and seconds).
  """
  t_start = time.perf_counter()
  check_caches(p, extractor.fingerprint)
  sample_f, t_sample, fresh_s = _features(extractor, p.samples,
                                          p.sample_cache, "samples", progress)
  ref_f, t_ref, fresh_r = None, 0.0, False
  if p.ref_needs:
    ref_f, t_ref, fresh_r = _features(extractor, p.ref.images, p.ref_cache,
                                      "reference", progress)
  import jax
  if jax.process_index() == 0:
    if p.sample_cache and fresh_s:
      F.write_cache(p.sample_cache, sample_f,
                    F.cache_meta(p.samples, extractor.fingerprint))
    if p.ref_cache and fresh_r:
      F.write_cache(p.ref_cache, ref_f,
                    F.cache_meta(p.ref.images, extractor.fingerprint))

  t0 = time.perf_counter()
  out = {}
  if "is" in p.names:
    out["inception_score"] = metrics.inception_score(
        sample_f["logits_unbiased"])
  for name, feat in (("fid", "pool"), ("sfid", "spatial")):
    if name in p.names:
      ref_stats = p.ref.stats.get(feat) or metrics.compute_statistics(
          ref_f[feat])
      out[name] = metrics.frechet_distance(
          metrics.compute_statistics(sample_f[feat]), ref_stats)
  if "precision" in p.names or "recall" in p.names:
    prec, rec = metrics.precision_recall(ref_f["pool"], sample_f["pool"])
    if "precision" in p.names:
      out["precision"] = prec
    if "recall" in p.names:
      out["recall"] = rec
  t_metrics = time.perf_counter() - t0
  n = p.samples.n
  out.update({
      "num_samples": n,
      "num_ref": (p.ref.images.n if p.ref is not None and p.ref.images
                  is not None else None),
      "ref_precomputed": sorted(p.ref.stats) if p.ref is not None else [],
      "samples": p.samples.describe(),
      "ref": p.ref.path if p.ref is not None else None,
      "seconds": {"sample_features": round(t_sample, 3),
                  "ref_features": round(t_ref, 3),
                  "metrics": round(t_metrics, 3),
                  "total": round(time.perf_counter() - t_start, 3)},
      "sample_images_per_second": (round(n / t_sample, 2) if t_sample > 0
                                   else None),
  })
  return out


_LABELS = {"is": "Inception Score", "fid": "FID", "sfid": "sFID",
           "precision": "precision", "recall": "recall"}


def ref_note(p: Plan) -> str | None:
  """One line saying what a reference would add, when metrics were left
  out for the lack of one; None otherwise."""
  if not p.need_ref:
    return None
  names = [_LABELS[m] for m in p.need_ref]
  listed = names[0]
  if len(names) > 1:
    listed = f"{', '.join(names[:-1])} and {names[-1]}"
  return (f"no --ref: computed the Inception Score only; --ref REF (an ADM "
          f"reference batch .npz or an image folder) would add {listed}")


def table(result: dict) -> str:
  """The result as a small readable table."""
  rows = [("Inception Score", "inception_score"), ("FID", "fid"),
          ("sFID", "sfid"), ("Precision", "precision"), ("Recall", "recall")]
  lines = [f"{'metric':<16}{'value':>12}"]
  for label, key in rows:
    if key in result:
      lines.append(f"{label:<16}{result[key]:>12.4f}")
  lines.append(f"{'samples':<16}{result['num_samples']:>12d}")
  if result.get("num_ref") is not None:
    lines.append(f"{'reference':<16}{result['num_ref']:>12d}")
  s = result["seconds"]
  lines.append(f"{'seconds':<16}{s['total']:>12.1f}")
  return "\n".join(lines)

