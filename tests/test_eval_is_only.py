"""`var-jax eval SAMPLES` with no reference: the Inception Score, and a line
saying what `--ref` would add.

The Inception has random weights (the golden seed recipe), so the score
means nothing; what is tested is which metrics run, the output and the note.
"""

import json

import numpy as np
import pytest
from pth_writer import write_pth

from var_jax import cli
from var_jax.convert import inception as ci
from var_jax.eval import suite

_NOTE = ("no --ref: computed the Inception Score only; --ref REF (an ADM "
         "reference batch .npz or an image folder) would add FID, sFID, "
         "precision and recall")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
  write_pth(path, ci.random_state_dict(0))
  return path


@pytest.fixture
def samples(tmp_path):
  path = tmp_path / "samples.npz"
  images = np.random.default_rng(0).integers(0, 256, (5, 40, 40, 3), np.uint8)
  np.savez(path, arr_0=images)
  return path


def _eval(argv, capsys):
  rc = cli.main(["eval"] + [str(a) for a in argv] + ["--no-progress"])
  cap = capsys.readouterr()
  return rc, cap.out, cap.err


@pytest.mark.slow  # End to end: a whole eval run.
def test_no_ref_no_metrics_scores_is_and_says_what_ref_adds(
    weights, samples, capsys):
  rc, out, err = _eval([samples, "--inception", weights, "--batch", 4],
                       capsys)
  assert rc == 0, err
  result = json.loads(out)
  assert out.count("\n") == 1
  assert 1.0 <= result["inception_score"] <= 5.0
  assert not {"fid", "sfid", "precision", "recall"} & set(result)
  assert result["num_samples"] == 5 and result["ref"] is None
  lines = err.strip().splitlines()
  assert lines[-1] == _NOTE
  assert sum(_NOTE in line for line in lines) == 1
  assert "Inception Score" in err

  # The same score as asking for the IS alone, which prints no note.
  rc, out, err = _eval([samples, "--inception", weights, "--batch", 4,
                        "--metrics", "is"], capsys)
  assert rc == 0, err
  assert json.loads(out)["inception_score"] == result["inception_score"]
  assert "--ref" not in err


def test_plan_without_ref_or_metrics_is_the_inception_score(samples):
  p = suite.plan(samples, None, None)
  assert p.names == ("is",)
  assert p.need_ref == ("fid", "sfid", "precision", "recall")
  assert suite.ref_note(p) == _NOTE
  named = suite.plan(samples, None, "is")
  assert named.need_ref == () and suite.ref_note(named) is None


def test_metrics_named_without_ref_are_still_an_error(weights, samples,
                                                      tmp_path, capsys):
  # Asking for all metrics by name is a request the inputs cannot meet.
  rc, out, err = _eval([samples, "--inception", weights, "--metrics", "all",
                        "--out", tmp_path / "r.json"], capsys)
  assert rc == 2 and out == ""
  assert err.strip() == ("var-jax eval: error: --ref is needed for fid, sfid, "
                         "precision, recall (only the Inception Score works "
                         "without a reference)")
  assert not (tmp_path / "r.json").exists()
