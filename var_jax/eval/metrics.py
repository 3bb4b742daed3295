"""The ADM evaluator's statistics: FID, sFID, Inception Score, precision, recall.

Each function computes what openai/guided-diffusion `evaluations/evaluator.py`
computes, in the same precision, so that the numbers equal the ones papers
print (VAR, DiT, ADM, CoDe): float32 means and float64 `np.cov`, the Fréchet
distance with its singular-product fallback and imaginary-part check, the IS
over chunks of 5000, and the k=3 `ManifoldEstimator` whose pairwise distances
are computed in float16 (float32 only for a block holding a non-finite
float16 distance).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from var_jax.errors import DataError

# `ManifoldEstimator` defaults: the float16/float32 choice is made per block
# of this size, so the block size is part of the definition.
ROW_BLOCK = 10000
COL_BLOCK = 10000
# Rows computed at once inside a block (memory only; results do not depend
# on it).
SUB_BLOCK = 1024
NHOOD = 3  # k, counting the point itself at index 0.
IS_SPLIT = 5000


@dataclasses.dataclass(frozen=True)
class FIDStatistics:
  """Mean (D,) and covariance (D, D) of a feature set (`FIDStatistics`)."""

  mu: np.ndarray
  sigma: np.ndarray

  @property
  def dim(self) -> int:
    return int(np.atleast_1d(self.mu).shape[0])


def compute_statistics(acts_ND: np.ndarray,
                       block: int = 4096) -> FIDStatistics:
  """`Evaluator.compute_statistics`: `np.mean(acts, 0)` (in the features'
  dtype, float32 for float32 features, as numpy gives it) and
  `np.cov(acts, rowvar=False)` (float64).

  The covariance is np.cov's float64 arithmetic (mean removed, X^T X /
  (N - 1)) summed over blocks of `block` rows, so that 50k x 2048 features
  need no 0.8 GB float64 copy (np.cov makes two); it agrees with np.cov to
  float64 rounding.

  Raises:
    DataError: fewer than 2 feature vectors.
  """
  acts_ND = np.asarray(acts_ND)
  if acts_ND.ndim != 2 or len(acts_ND) < 2:
    raise DataError(f"statistics need at least 2 feature vectors, got shape "
                    f"{acts_ND.shape}")
  n, d = acts_ND.shape
  avg = np.zeros((d,), np.float64)
  for i in range(0, n, block):
    avg += acts_ND[i:i + block].sum(axis=0, dtype=np.float64)
  avg /= n
  cov = np.zeros((d, d), np.float64)
  for i in range(0, n, block):
    x = acts_ND[i:i + block].astype(np.float64) - avg
    cov += x.T @ x
  cov /= n - 1
  return FIDStatistics(np.mean(acts_ND, axis=0), cov)


def frechet_distance(a: FIDStatistics, b: FIDStatistics,
                     eps: float = 1e-6) -> float:
  """`FIDStatistics.frechet_distance`: |mu_a - mu_b|^2 + tr(S_a + S_b -
  2 sqrt(S_a S_b)).

  When `sqrtm` of the product is not finite, eps is added to both diagonals
  and the root taken again (with a warning, as the evaluator); a complex root
  whose diagonal has an imaginary part above 1e-3 is an error, a smaller one
  is dropped.

  Raises:
    DataError: the two sets have different widths, or the root is complex.
  """
  mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
  s1, s2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise DataError(f"feature statistics of different widths: mean {mu1.shape}"
                    f" / covariance {s1.shape} vs {mu2.shape} / {s2.shape}")
  diff = mu1 - mu2
  with warnings.catch_warnings():
    # The evaluator asks for no printout (disp=False) and checks finiteness
    # itself; so do we.
    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    covmean = linalg.sqrtm(s1.dot(s2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"FID: the covariance product is singular; adding {eps} to "
                  "the diagonals")
    offset = np.eye(s1.shape[0]) * eps
    covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      m = np.max(np.abs(covmean.imag))
      raise DataError(f"FID: the square root of the covariance product has an "
                      f"imaginary component of {m:.3g} (too few or "
                      "degenerate images?)")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(s1) + np.trace(s2)
               - 2 * np.trace(covmean))


def softmax_f32(logits_NK: np.ndarray) -> np.ndarray:
  """Row softmax in float32: exp(x - max) times the reciprocal of its sum
  (TensorFlow's CPU kernel, which the evaluator's softmax graph runs)."""
  x = np.asarray(logits_NK, np.float32)
  e = np.exp(x - x.max(axis=1, keepdims=True))
  return e * (np.float32(1) / e.sum(axis=1, keepdims=True))


def inception_score(logits_unbiased_NK: np.ndarray,
                    split_size: int = IS_SPLIT) -> float:
  """`Evaluator.compute_inception_score` of the unbiased logits.

  The softmax rows are split into consecutive chunks of `split_size` (the last
  may be shorter); each gives exp(mean KL(p(y|x) || p(y))), and the result is
  their mean. float32 throughout, as the evaluator's numpy code.
  """
  preds = softmax_f32(logits_unbiased_NK)
  if len(preds) == 0:
    raise DataError("the Inception Score needs at least one image")
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


# ---------------------------------------------------------------------------
# Precision and recall (`ManifoldEstimator`, `DistanceBlock`).


@jax.jit
def _distances_f16(u_MD, v_ND):
  """`DistanceBlock`'s float16 path: inputs rounded to float16, squared norms
  and dot products accumulated in float32 and rounded to float16, then
  max(|u|^2 - 2 u.v + |v|^2, 0) in float16 arithmetic.

  This matches the evaluator's TensorFlow CPU graph on the golden set; pure
  float16 accumulation or float16 squares do not (they move precision and
  recall by a point).
  """
  f16, f32 = jnp.float16, jnp.float32
  u = u_MD.astype(f16).astype(f32)
  v = v_ND.astype(f16).astype(f32)
  nu = jnp.sum(u * u, axis=1).astype(f16)[:, None]
  nv = jnp.sum(v * v, axis=1).astype(f16)[None, :]
  uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST).astype(f16)
  d = jnp.maximum(nu - f16(2) * uv + nv, f16(0))
  return d.astype(f32), jnp.all(jnp.isfinite(d))


@jax.jit
def _distances_f32(u_MD, v_ND):
  """The float32 fallback of `DistanceBlock`."""
  u, v = u_MD.astype(jnp.float32), v_ND.astype(jnp.float32)
  nu = jnp.sum(u * u, axis=1)[:, None]
  nv = jnp.sum(v * v, axis=1)[None, :]
  uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(nu - 2 * uv + nv, 0.0)


def pairwise_distances(u_MD, v_ND) -> jax.Array:
  """Squared distances (M, N) float32, float16 unless that overflows (one
  `DistanceBlock.pairwise_distances` call)."""
  d, finite = _distances_f16(u_MD, v_ND)
  return d if bool(finite) else _distances_f32(u_MD, v_ND)


def _distances(u, v, f32: bool):
  if f32:
    return _distances_f32(u, v), jnp.bool_(True)
  return _distances_f16(u, v)


@functools.partial(jax.jit, static_argnames=("keep", "f32"))
def _smallest_part(u_MD, v_ND, keep: int, f32: bool):
  """The `keep` smallest distances of each row of u to v, and whether all
  distances were finite."""
  d, finite = _distances(u_MD, v_ND, f32)
  return -jax.lax.top_k(-d, keep)[0], finite


@functools.partial(jax.jit, static_argnames=("f32",))
def _covered_part(u_MD, v_ND, radii_u_M, radii_v_N, f32: bool):
  """(rows of u inside some ball of v, columns of v inside some ball of u,
  all distances finite) — `DistanceBlock.less_thans`."""
  d, finite = _distances(u_MD, v_ND, f32)
  rows_in = jnp.any(d <= radii_v_N[None, :], axis=1)
  cols_in = jnp.any(d <= radii_u_M[:, None], axis=0)
  return rows_in, cols_in, finite


def _per_block(fn, rows: int, sub: int):
  """`fn(row_part, f32)` over row parts of one evaluator block.

  The evaluator decides float16 or float32 once per (rows x cols) block: if
  any float16 distance of the block is not finite, the whole block is redone
  in float32. The block is computed `sub` rows at a time (a 10000 x 10000
  block in one piece would hold 1.5 GB), the decision kept per block.
  """
  outs = [fn(i, False) for i in range(0, rows, sub)]
  if not all(bool(o[-1]) for o in outs):
    outs = [fn(i, True) for i in range(0, rows, sub)]
  return [o[:-1] for o in outs]


def manifold_radii(feats_ND: np.ndarray, k: int = NHOOD,
                   row_block: int = ROW_BLOCK, col_block: int = COL_BLOCK,
                   sub_block: int = SUB_BLOCK) -> np.ndarray:
  """`ManifoldEstimator.manifold_radii`: per point, the (k+1)-th smallest
  squared distance to its own set (itself counted at index 0), float32 (N,).

  Each row keeps only its k+1 smallest distances across column blocks, so a
  50k x 50k matrix never sits in memory.

  Raises:
    DataError: k or fewer points.
  """
  feats_ND = np.asarray(feats_ND, np.float32)
  n = len(feats_ND)
  if n <= k:
    raise DataError(f"precision/recall need more than {k} images per set, "
                    f"got {n}")
  radii = np.zeros((n,), np.float32)
  for r0 in range(0, n, row_block):
    rows = feats_ND[r0:r0 + row_block]
    best = None
    for c0 in range(0, n, col_block):
      cols = jnp.asarray(feats_ND[c0:c0 + col_block])
      keep = min(k + 1, len(cols))
      parts = _per_block(
          lambda i, f32: _smallest_part(jnp.asarray(rows[i:i + sub_block]),
                                        cols, keep=keep, f32=f32),
          len(rows), sub_block)
      cand = np.concatenate([np.asarray(p[0]) for p in parts])
      best = cand if best is None else np.sort(
          np.concatenate([best, cand], axis=1), axis=1)[:, :k + 1]
    radii[r0:r0 + row_block] = best[:, k]
  return radii


def precision_recall(ref_ND: np.ndarray, sample_ND: np.ndarray,
                     k: int = NHOOD, row_block: int = ROW_BLOCK,
                     col_block: int = COL_BLOCK,
                     sub_block: int = SUB_BLOCK) -> tuple[float, float]:
  """`Evaluator.compute_prec_recall`: (precision, recall) of the samples.

  Precision: the fraction of samples inside some reference point's k-NN
  ball; recall: the fraction of reference points inside some sample's ball
  (a point is inside when its squared distance is <= the radius).

  Raises:
    DataError: feature widths differ, or a set has k or fewer points.
  """
  ref_ND = np.asarray(ref_ND, np.float32)
  sample_ND = np.asarray(sample_ND, np.float32)
  if ref_ND.shape[1:] != sample_ND.shape[1:]:
    raise DataError(f"precision/recall: reference features have width "
                    f"{ref_ND.shape[1:]}, samples {sample_ND.shape[1:]}")
  r_ref = manifold_radii(ref_ND, k, row_block, col_block, sub_block)
  r_sam = manifold_radii(sample_ND, k, row_block, col_block, sub_block)
  ref_in = np.zeros((len(ref_ND),), bool)
  sam_in = np.zeros((len(sample_ND),), bool)
  for r0 in range(0, len(ref_ND), row_block):
    rows, rr = ref_ND[r0:r0 + row_block], r_ref[r0:r0 + row_block]
    for c0 in range(0, len(sample_ND), col_block):
      cols = jnp.asarray(sample_ND[c0:c0 + col_block])
      rc = jnp.asarray(r_sam[c0:c0 + col_block])
      parts = _per_block(
          lambda i, f32: _covered_part(
              jnp.asarray(rows[i:i + sub_block]), cols,
              jnp.asarray(rr[i:i + sub_block]), rc, f32=f32),
          len(rows), sub_block)
      for i, (a, b) in zip(range(0, len(rows), sub_block), parts):
        ref_in[r0 + i:r0 + i + len(a)] |= np.asarray(a)
        sam_in[c0:c0 + len(b)] |= np.asarray(b)
  return float(np.mean(sam_in)), float(np.mean(ref_in))
