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
#
# The evaluator's distance block is `max(|u|^2 - 2 u.v + |v|^2, 0)` on the
# features cast to float16, done by TensorFlow's CPU kernels, which decide
# every rounding:
# - `tf.square`: each square rounded to float16.
# - `tf.reduce_sum` over the 2048 squares: Eigen's tree reduction with
#   float16 accumulators (`_eigen_row_sums`): halves split at a packet
#   boundary above 8 x 200 values, four 8-lane accumulators per leaf, each
#   addition rounded to float16, the lanes added in float32 and rounded once.
# - `tf.matmul`: the float16 operands converted to float32, multiplied in
#   float32 (each product is exact, only the summation order is the
#   library's) and each result rounded once to float16.
# - `2 * uv`, `- `, `+ `: each rounded to float16, so `2 u.v` above 65504
#   becomes inf and the distance max(-inf, 0) = 0; `tf.maximum` keeps NaN
#   (an overflowed norm minus an overflowed product).
# - A block with any non-finite float16 distance is redone in float32
#   (squares and Eigen's float32 tree sums, a float32 matmul).
# XLA keeps float16 intermediates in float32 (excess precision), so the
# roundings are made explicit below (`_round_f16`) on float32 values.

# Eigen's packet width for float and half in TensorFlow's CPU kernels (AVX
# build) and its tree-reduction leaf sizes (values per packet lane).
_PACKET = 8
_LEAF = {np.dtype(np.float16): 200, np.dtype(np.float32): 1024}
# Rows of a feature set reduced at once by `_eigen_row_sums` (memory only).
_NORM_ROWS = 4096


def _round_f16(x):
  """float32 -> the nearest float16 value, as float32 (round half to even,
  overflow to +-inf, float16 subnormals kept, NaN kept).

  Integer arithmetic on the bits, so that XLA cannot skip the rounding the
  way it skips a float32 -> float16 -> float32 round trip.
  """
  u32 = jnp.uint32
  bits = jax.lax.bitcast_convert_type(x, u32)
  sign = bits & u32(0x80000000)
  mag = bits & u32(0x7FFFFFFF)
  # Normal float16 range (|x| >= 2^-14): keep 10 of the 23 mantissa bits.
  lsb = (mag >> 13) & u32(1)
  normal = (mag + u32(0xFFF) + lsb) & u32(0xFFFFE000)
  normal = jnp.where(normal > u32(0x477FE000), u32(0x7F800000), normal)
  # Subnormal range: a multiple of 2^-24 (scaling by 2^24 is exact).
  absx = jax.lax.bitcast_convert_type(mag, jnp.float32)
  sub = jnp.round(absx * jnp.float32(2.0**24)) * jnp.float32(2.0**-24)
  sub = jax.lax.bitcast_convert_type(sub, u32)
  out = jnp.where(mag >= u32(0x7F800000), mag,
                  jnp.where(mag >= u32(0x38800000), normal, sub))
  return jax.lax.bitcast_convert_type(sign | out, jnp.float32)


def _lanes_sum(acc_P):
  """Eigen's `predux` of an 8-lane packet: halves added, then pairs, in
  float32."""
  a = acc_P.astype(np.float32)
  while a.shape[-1] > 1:
    h = a.shape[-1] // 2
    a = a[..., :h] + a[..., h:]
  return a[..., 0]


def _leaf_sum(x_NK, dtype):
  """Eigen's vectorized inner-dimension reduction of one leaf, in `dtype`."""
  P = _PACKET
  n, k = x_NK.shape

  def add(a, b):
    return (a.astype(np.float32) + b.astype(np.float32)).astype(dtype)

  acc0 = np.zeros((n, P), dtype)
  start = 0
  if k >= 4 * P:
    v4 = (k // (4 * P)) * 4 * P
    blocks = x_NK[:, :v4].reshape(n, v4 // (4 * P), 4, P)
    acc = [acc0] + [np.zeros((n, P), dtype) for _ in range(3)]
    for j in range(blocks.shape[1]):
      for q in range(4):
        acc[q] = add(acc[q], blocks[:, j, q])
    acc0 = add(add(add(acc[0], acc[1]), acc[2]), acc[3])
    start = v4
  if start <= k - P:
    vs = (k // P) * P
    for j in range(start, vs, P):
      acc0 = add(acc0, x_NK[:, j:j + P])
    start = vs
  scalar = np.zeros((n,), dtype)
  for j in range(start, k):
    scalar = add(scalar, x_NK[:, j])
  return add(scalar, _lanes_sum(acc0).astype(dtype))


def _tree_sum(x_NK, first: int, dtype):
  """Eigen's tree reduction (`InnerMostDimReducer`, vectorized): values
  beyond packet x leaf are split in two at a packet boundary counted from
  the row's start (`first` is this part's offset), each half reduced
  recursively, the halves added in `dtype`."""
  P, k = _PACKET, x_NK.shape[1]
  if k <= P * _LEAF[np.dtype(dtype)]:
    return _leaf_sum(x_NK, dtype)
  split = P * -(-(first + -(-k // 2)) // P)
  left = min(split - first, k)
  acc = _tree_sum(x_NK[:, :left], first, dtype)
  if left < k:
    acc = (acc.astype(np.float32) + _tree_sum(
        x_NK[:, left:], split, dtype).astype(np.float32)).astype(dtype)
  return acc


def _eigen_row_sums(feats_ND: np.ndarray, dtype) -> np.ndarray:
  """`tf.reduce_sum(tf.square(tf.cast(x, dtype)), 1)` as TensorFlow's CPU
  kernels compute it, as float32 (N,)."""
  feats_ND = np.asarray(feats_ND, np.float32)
  out = np.zeros((len(feats_ND),), np.float32)
  with np.errstate(over="ignore", invalid="ignore"):
    for r0 in range(0, len(feats_ND), _NORM_ROWS):
      x = feats_ND[r0:r0 + _NORM_ROWS].astype(dtype).astype(np.float32)
      sq = (x * x).astype(dtype)
      out[r0:r0 + _NORM_ROWS] = _tree_sum(sq, 0, dtype).astype(np.float32)
  return out


@dataclasses.dataclass(frozen=True)
class _Side:
  """One feature set with both squared norms the evaluator can use."""

  feats: np.ndarray  # (N, D) float32
  norm16: np.ndarray  # (N,) float16 squared norms, as float32
  norm32: np.ndarray  # (N,) float32 squared norms

  @classmethod
  def of(cls, feats_ND) -> "_Side":
    feats_ND = np.asarray(feats_ND, np.float32)
    return cls(feats_ND, _eigen_row_sums(feats_ND, np.float16),
               _eigen_row_sums(feats_ND, np.float32))

  def rows(self, i: int, n: int) -> tuple:
    return (self.feats[i:i + n], self.norm16[i:i + n], self.norm32[i:i + n])


@jax.jit
def _distances_f16(u_MD, v_ND, nu_M, nv_N):
  """`DistanceBlock`'s float16 path on float32 features and the float16
  squared norms (`_eigen_row_sums`): (distances (M, N) as float32, whether
  all are finite)."""
  u, v = _round_f16(u_MD), _round_f16(v_ND)
  uv = _round_f16(jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST))
  two_uv = _round_f16(2 * uv)  # exact unless above 65504: inf.
  d = _round_f16(_round_f16(nu_M[:, None] - two_uv) + nv_N[None, :])
  d = jnp.where(jnp.isnan(d), d, jnp.maximum(d, 0.0))
  return d, jnp.all(jnp.isfinite(d))


@jax.jit
def _distances_f32(u_MD, v_ND, nu_M, nv_N):
  """The float32 fallback of `DistanceBlock` (float32 squared norms)."""
  uv = jnp.dot(u_MD, v_ND.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(nu_M[:, None] - 2 * uv + nv_N[None, :], 0.0)


def pairwise_distances(u_MD, v_ND) -> jax.Array:
  """Squared distances (M, N) float32, float16 unless that gives a
  non-finite value (one `DistanceBlock.pairwise_distances` call)."""
  u, v = _Side.of(u_MD), _Side.of(v_ND)
  d, finite = _distances_f16(u.feats, v.feats, u.norm16, v.norm16)
  if bool(finite):
    return d
  return _distances_f32(u.feats, v.feats, u.norm32, v.norm32)


def _distances(u, v, f32: bool):
  """(distances, finite) of row part `u` and column block `v`, each a
  `_Side.rows` triple (features, float16 norms, float32 norms)."""
  if f32:
    return _distances_f32(u[0], v[0], u[2], v[2]), jnp.bool_(True)
  return _distances_f16(u[0], v[0], u[1], v[1])


@functools.partial(jax.jit, static_argnames=("keep", "f32"))
def _smallest_part(u, v, keep: int, f32: bool):
  """The `keep` smallest distances of each row of u to v, and whether all
  distances were finite."""
  d, finite = _distances(u, v, f32)
  return -jax.lax.top_k(-d, keep)[0], finite


@functools.partial(jax.jit, static_argnames=("f32",))
def _covered_part(u, v, radii_u_M, radii_v_N, f32: bool):
  """(rows of u inside some ball of v, columns of v inside some ball of u,
  all distances finite) — `DistanceBlock.less_thans`."""
  d, finite = _distances(u, v, f32)
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


def _device_rows(side: _Side, i: int, n: int) -> tuple:
  return tuple(jnp.asarray(a) for a in side.rows(i, n))


def _radii(side: _Side, k: int, row_block: int, col_block: int,
           sub_block: int) -> np.ndarray:
  n = len(side.feats)
  if n <= k:
    raise DataError(f"precision/recall need more than {k} images per set, "
                    f"got {n}")
  radii = np.zeros((n,), np.float32)
  for r0 in range(0, n, row_block):
    n_rows = min(row_block, n - r0)
    best = None
    for c0 in range(0, n, col_block):
      cols = _device_rows(side, c0, col_block)
      keep = min(k + 1, len(cols[0]))
      parts = _per_block(
          lambda i, f32: _smallest_part(
              _device_rows(side, r0 + i, min(sub_block, n_rows - i)), cols,
              keep=keep, f32=f32),
          n_rows, sub_block)
      cand = np.concatenate([np.asarray(p[0]) for p in parts])
      best = cand if best is None else np.sort(
          np.concatenate([best, cand], axis=1), axis=1)[:, :k + 1]
    radii[r0:r0 + n_rows] = best[:, k]
  return radii


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
  return _radii(_Side.of(feats_ND), k, row_block, col_block, sub_block)


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
  ref, sam = _Side.of(ref_ND), _Side.of(sample_ND)
  r_ref = _radii(ref, k, row_block, col_block, sub_block)
  r_sam = _radii(sam, k, row_block, col_block, sub_block)
  ref_in = np.zeros((len(ref_ND),), bool)
  sam_in = np.zeros((len(sample_ND),), bool)
  for r0 in range(0, len(ref_ND), row_block):
    n_rows = min(row_block, len(ref_ND) - r0)
    rr = r_ref[r0:r0 + n_rows]
    for c0 in range(0, len(sample_ND), col_block):
      cols = _device_rows(sam, c0, col_block)
      rc = jnp.asarray(r_sam[c0:c0 + col_block])
      parts = _per_block(
          lambda i, f32: _covered_part(
              _device_rows(ref, r0 + i, min(sub_block, n_rows - i)), cols,
              jnp.asarray(rr[i:i + sub_block]), rc, f32=f32),
          n_rows, sub_block)
      for i, (a, b) in zip(range(0, n_rows, sub_block), parts):
        ref_in[r0 + i:r0 + i + len(a)] |= np.asarray(a)
        sam_in[c0:c0 + len(b)] |= np.asarray(b)
  return float(np.mean(sam_in)), float(np.mean(ref_in))
