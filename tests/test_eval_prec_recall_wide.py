"""Precision and recall at the magnitudes real Inception pool features reach
(golden `eval/adm_eval_wide.npz`: 2048-wide sets, squared norms in the
thousands, where float16's spacing is 0.25-8 and the evaluator's exact
float16 arithmetic decides coverage), and the pieces of that rule."""

import jax
import numpy as np
import pytest

from var_jax.eval import metrics as M

CASES = ("mid", "high", "mixed")


@pytest.fixture(scope="module")
def wide(golden_dir):
  return dict(np.load(golden_dir / "eval" / "adm_eval_wide.npz"))


@pytest.mark.parametrize("case", CASES)
def test_precision_recall_equal_the_evaluator(wide, case):
  got = M.precision_recall(wide[f"{case}_ref_pool"],
                           wide[f"{case}_sample_pool"])
  assert got == (float(wide[f"{case}_precision"]),
                 float(wide[f"{case}_recall"]))


@pytest.mark.parametrize("case", CASES)
def test_cases_are_at_the_magnitudes_they_claim(wide, case):
  feats = np.concatenate([wide[f"{case}_ref_pool"],
                          wide[f"{case}_sample_pool"]]).astype(np.float64)
  got = float((feats ** 2).sum(1).max())
  assert abs(got - float(wide[f"{case}_max_sq_norm"])) <= 1e-6 * got


def test_mid_needs_float16_row_sums_in_eigens_order(wide, monkeypatch):
  # Squared norms summed in float32 and rounded once to float16 (instead of
  # TensorFlow's float16 tree sum) cover one reference point too many.
  exact = M._eigen_row_sums

  def f32_then_round(feats, dtype):
    if np.dtype(dtype) != np.float16:
      return exact(feats, dtype)
    x = np.asarray(feats, np.float32).astype(np.float16).astype(np.float32)
    return (x * x).sum(1, dtype=np.float32).astype(np.float16).astype(
        np.float32)

  monkeypatch.setattr(M, "_eigen_row_sums", f32_then_round)
  assert M.precision_recall(wide["mid_ref_pool"],
                            wide["mid_sample_pool"]) == (0.29, 162 / 240)


def _f16(u, v):
  a, b = M._Side.of(np.float32(u)), M._Side.of(np.float32(v))
  d, finite = M._distances_f16(a.feats, b.feats, a.norm16, b.norm16)
  return np.asarray(d), bool(finite)


def test_overflowed_product_gives_distance_zero():
  # u = 200, v = 180 (true squared distance 400): 2 u.v = 72000 > 65504 is
  # float16 inf, and max(40000 - inf + 32400, 0) = 0, finite, so no float32
  # fallback (the `high` case's precision 0.90 comes from such zeros).
  d, finite = _f16([[200.0]], [[180.0]])
  assert finite and d[0, 0] == 0.0
  assert float(M.pairwise_distances(np.float32([[200.0]]),
                                    np.float32([[180.0]]))[0, 0]) == 0.0


def test_overflowed_norm_gives_nan_and_the_float32_path():
  # |u|^2 = 90000 overflows: inf - inf = NaN, which tf.maximum keeps, so the
  # block is redone in float32 (the `mixed` case's scaled samples).
  d, finite = _f16([[300.0], [1.0]], [[299.0]])
  assert not finite and np.isnan(d[0, 0]) and d[1, 0] == np.inf
  got = np.asarray(M.pairwise_distances(np.float32([[300.0], [1.0]]),
                                        np.float32([[299.0]])))
  np.testing.assert_array_equal(got, [[1.0], [298.0 ** 2]])


def test_each_step_rounds_to_float16():
  # u = 100, v = 101 (true squared distance 1): |u|^2 = 10000, u.v = 10100
  # -> 10096 (spacing 8, half to even), 2 u.v = 20192, |v|^2 = 10201 ->
  # 10200; 10000 - 20192 = -10192, + 10200 = 8.
  d, finite = _f16([[100.0]], [[101.0]])
  assert finite and d[0, 0] == 8.0


def test_round_f16_equals_numpys_float16_cast():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(
      np.uint32).view(np.float32)
  mags = 10.0 ** rng.uniform(-9, 6, 100_000)
  edges = np.float32([65504, 65519.996, 65520, 65536, 6.1035156e-05, 6.1e-5,
                      2**-24, 2**-25, 1.5 * 2**-25, 3 * 2**-26, 0.0,
                      1 + 2**-11, 1 + 3 * 2**-11, np.inf])
  x = np.concatenate([x, (mags * rng.standard_normal(mags.size)).astype(
      np.float32), edges, -edges])
  with np.errstate(over="ignore"):
    want = x.astype(np.float16).astype(np.float32)
  got = np.asarray(jax.jit(M._round_f16)(x))
  same = (got.view(np.uint32) == want.view(np.uint32)) | (
      np.isnan(got) & np.isnan(want))
  assert same.all(), x[~same][:5]


def test_row_sums_follow_eigens_tree():
  # 2048 float16 squares: two halves of 1024 (more than 8 lanes x 200), each
  # summed in four 8-lane float16 accumulators, 32 values per lane.
  x = np.ones((1, 2048), np.float32)
  assert M._eigen_row_sums(x, np.float16)[0] == 2048.0
  # A first square of 2048 (45.25^2 = 2047.56 rounds to 2048): the 31 ones
  # that follow in its lane are lost (2048 + 1 ties to 2048, float16's
  # spacing there is 2); every other one is kept: 2048 + 2047 - 31 = 4064.
  # Summed in float32 and rounded once it would be 4094.
  x[0, 0] = 45.25
  assert M._eigen_row_sums(x, np.float16)[0] == 4064.0
  # float32 sums: one leaf (2048 <= 8 x 1024), exact here.
  assert M._eigen_row_sums(x, np.float32)[0] == np.float32(2047.0 + 45.25**2)
