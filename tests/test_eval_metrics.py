"""The ADM evaluator's statistics against its own outputs (golden `eval/`)."""

import numpy as np
import pytest

from var_jax.errors import DataError
from var_jax.eval import metrics as M


@pytest.fixture(scope="module")
def adm(golden_dir):
  return dict(np.load(golden_dir / "eval" / "adm_eval.npz"))


def _rel(a, b):
  return abs(a - float(b)) / abs(float(b))


def test_fid_and_sfid(adm):
  fid = M.frechet_distance(M.compute_statistics(adm["sample_pool"]),
                           M.compute_statistics(adm["ref_pool"]))
  sfid = M.frechet_distance(M.compute_statistics(adm["sample_spatial"]),
                            M.compute_statistics(adm["ref_spatial"]))
  assert _rel(fid, adm["fid"]) <= 1e-5, (fid, adm["fid"])
  assert _rel(sfid, adm["sfid"]) <= 1e-5, (sfid, adm["sfid"])


@pytest.mark.parametrize("split", [5000, 100])
def test_inception_score(adm, split):
  got = M.inception_score(adm["sample_logits_unbiased"], split_size=split)
  want = adm[f"is_split{split}"]
  assert _rel(got, want) <= 1e-5, (got, want)


def test_precision_recall_exact(adm):
  prec, rec = M.precision_recall(adm["ref_pool"], adm["sample_pool"])
  assert (prec, rec) == (float(adm["precision"]), float(adm["recall"]))


def test_precision_recall_do_not_depend_on_block_size(adm):
  # Small blocks: the radii merge over column blocks and the coverage
  # accumulate over row blocks (no block holds a non-finite float16 value).
  got = M.precision_recall(adm["ref_pool"], adm["sample_pool"], row_block=300,
                           col_block=256)
  assert got == (float(adm["precision"]), float(adm["recall"]))


def _f32(u, v):
  """The float32 fallback distances of two whole sets."""
  a, b = M._Side.of(u), M._Side.of(v)
  return np.asarray(M._distances_f32(a.feats, b.feats, a.norm32, b.norm32))


def test_float32_only_distances_would_move_recall(adm):
  # The reason for the float16 path: in float32 recall is 0.755, not 0.754.
  r = _f32(adm["ref_pool"], adm["ref_pool"])
  s = _f32(adm["sample_pool"], adm["sample_pool"])
  d = _f32(adm["ref_pool"], adm["sample_pool"])
  r_ref, r_sam = np.partition(r, 3, 1)[:, 3], np.partition(s, 3, 1)[:, 3]
  assert (d <= r_sam[None]).any(1).mean() == 0.755
  assert M.precision_recall(adm["ref_pool"], adm["sample_pool"])[1] == 0.754
  assert (d <= r_ref[:, None]).any(0).mean() == 0.3


def test_float16_overflow_falls_back_to_float32():
  rng = np.random.default_rng(0)
  u = rng.standard_normal((6, 8)).astype(np.float32) * 200  # |u|^2 > 65504
  v = rng.standard_normal((5, 8)).astype(np.float32) * 200
  d = np.asarray(M.pairwise_distances(u, v))
  want = ((u[:, None, :].astype(np.float64) - v[None]) ** 2).sum(-1)
  np.testing.assert_allclose(d, want, rtol=1e-5)
  a, b = M._Side.of(u), M._Side.of(v)
  _, finite = M._distances_f16(a.feats, b.feats, a.norm16, b.norm16)
  assert not bool(finite)


def test_identical_sets():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((40, 6)).astype(np.float32)
  assert M.precision_recall(x, x) == (1.0, 1.0)
  s = M.compute_statistics(x)
  assert abs(M.frechet_distance(s, s)) < 1e-6


def test_width_mismatch_is_a_data_error():
  a = M.FIDStatistics(np.zeros(4), np.eye(4))
  b = M.FIDStatistics(np.zeros(3), np.eye(3))
  with pytest.raises(DataError, match="different widths"):
    M.frechet_distance(a, b)


def test_too_few_points_for_k3():
  x = np.zeros((3, 4), np.float32)
  with pytest.raises(DataError, match="more than 3"):
    M.precision_recall(x, x)


def test_blocked_covariance_is_np_cov(adm):
  x = adm["sample_spatial"]
  s = M.compute_statistics(x, block=128)  # 800 rows: 7 blocks.
  want = np.cov(x, rowvar=False)
  assert s.sigma.dtype == np.float64 and s.mu.dtype == np.float32
  np.testing.assert_allclose(s.sigma, want, rtol=0, atol=1e-12 * np.abs(want).max())
  np.testing.assert_array_equal(s.mu, np.mean(x, axis=0))
