"""Shared test fixtures: the golden reference set, tolerances, small models."""

import os
import pathlib

import numpy as np
import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The copy the tests read, committed with the repository.
IN_REPO_GOLDEN = _ROOT / "tests" / "golden"
# Where the copy is refreshed from when it sits beside the repository.
SHARED_GOLDEN = _ROOT.parent / "shared" / "golden"


def golden_path() -> pathlib.Path:
  """$VAR_JAX_GOLDEN if set, else the repository's own tests/golden."""
  env = os.environ.get("VAR_JAX_GOLDEN")
  return pathlib.Path(env) if env else IN_REPO_GOLDEN


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
  """The golden directory; a missing one is a broken checkout, not a skip."""
  path = golden_path()
  if not (path / "README.md").exists():
    pytest.fail(f"golden reference set not found at {path} (tests/golden is "
                "part of the repository; $VAR_JAX_GOLDEN overrides it)")
  return path


@pytest.fixture(scope="session")
def golden(golden_dir):
  """Loads a golden .npz by stem, cached for the session."""
  cache = {}

  def load(stem: str):
    if stem not in cache:
      cache[stem] = dict(np.load(golden_dir / f"{stem}.npz"))
    return cache[stem]

  return load


def assert_close_rel(actual, expected, rel=1e-4, name="array"):
  """Max abs error at most `rel` times the reference's max magnitude."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
  err = np.max(np.abs(actual - expected))
  bound = rel * max(np.max(np.abs(expected)), 1e-30)
  assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e}"
  return err


@pytest.fixture(scope="session")
def random_digits_vae_dir(tmp_path_factory):
  """A model directory holding a randomly initialised digits tokenizer."""
  from flax import nnx

  from var_jax import checkpoint
  from var_jax.config import ModelConfig
  from var_jax.configs.models import DIGITS_VAE
  from var_jax.models.vqvae import VQVAE
  d = tmp_path_factory.mktemp("vae") / "digits_vae"
  checkpoint.save_model(d, ModelConfig("digits_vae", DIGITS_VAE),
                        vae=VQVAE(DIGITS_VAE, rngs=nnx.Rngs(0)))
  return d
