"""gs:// paths for real: var_jax.io and Orbax against a GCS emulator.

The emulator (fake-gcs-server, in memory, 127.0.0.1) is started by the
`gcs_emulator` fixture; gcsfs (etils.epath's gs:// backend) and tensorstore
(Orbax's array writes) are pointed at it by their emulator settings. What
landed in the bucket is read back through the emulator's JSON API directly,
not through the libraries under test, and the local working directory is
checked to stay empty: a `gs://` path must never become `./gs:/...`.
"""

import io as pyio
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from PIL import Image

from var_jax import io
from var_jax.errors import CheckpointError, UserError


def _prefix(gcs_dir: str) -> str:
  """The object-name prefix of a gs://bucket/prefix directory."""
  return gcs_dir.split("/", 3)[3]


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
  """Runs the test in an empty directory and checks it stays empty."""
  monkeypatch.chdir(tmp_path)
  yield tmp_path
  assert sorted(os.listdir(tmp_path)) == [], "a cloud path was written locally"


def test_npz_and_png_land_in_the_bucket(gcs_emulator, gcs_dir, empty_cwd):
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  io.save_npz(f"{gcs_dir}/out/a.npz", a=a)
  img = np.random.default_rng(0).integers(0, 256, (8, 6, 3), np.uint8)
  io.save_png(f"{gcs_dir}/out/img.png", img)

  p = _prefix(gcs_dir)
  # Exactly the two files, no temporary names left behind.
  assert sorted(gcs_emulator.objects(p)) == [f"{p}/out/a.npz",
                                             f"{p}/out/img.png"]
  got = np.load(pyio.BytesIO(gcs_emulator.read(f"{p}/out/a.npz")))
  np.testing.assert_array_equal(got["a"], a)
  got = Image.open(pyio.BytesIO(gcs_emulator.read(f"{p}/out/img.png")))
  np.testing.assert_array_equal(np.asarray(got), img)


def test_atomic_dir_creates_and_replaces(gcs_emulator, gcs_dir, empty_cwd):
  out = f"{gcs_dir}/model"
  with io.atomic_dir(out) as d:
    (d / "sub").mkdir(parents=True, exist_ok=True)
    (d / "a.txt").write_text("first")
    (d / "sub" / "b.txt").write_text("b")
  p = _prefix(gcs_dir)
  assert sorted(gcs_emulator.objects(p)) == [f"{p}/model/a.txt",
                                             f"{p}/model/sub/b.txt"]

  # An existing directory is refused before anything is written.
  with pytest.raises(CheckpointError, match="already exists"):
    with io.atomic_dir(out):
      pytest.fail("the body ran for an existing directory")
  with io.atomic_dir(out, overwrite=True) as d:
    (d / "a.txt").write_text("second")
  assert gcs_emulator.objects(p) == [f"{p}/model/a.txt"]
  assert epath.Path(out, "a.txt").read_text() == "second"


def test_orbax_saves_and_restores_through_tensorstore(gcs_emulator, gcs_dir,
                                                      empty_cwd):
  tree = {"w": jnp.arange(24.0).reshape(4, 6), "b": jnp.ones((3,), jnp.int32)}
  with ocp.CheckpointManager(epath.Path(gcs_dir) / "ckpt") as mngr:
    for step in (1, 2):
      mngr.save(step, args=ocp.args.StandardSave(
          jax_tree_scale(tree, step)))
    mngr.wait_until_finished()
  names = gcs_emulator.objects(_prefix(gcs_dir) + "/ckpt/2/")
  # The array data itself (written by tensorstore's gcs driver) is there.
  assert any("/d/" in n for n in names), names

  with ocp.CheckpointManager(epath.Path(gcs_dir) / "ckpt") as mngr:
    assert mngr.all_steps() == [1, 2]
    got = mngr.restore(2, args=ocp.args.StandardRestore(tree))
  for k, v in jax_tree_scale(tree, 2).items():
    np.testing.assert_array_equal(got[k], v)


def jax_tree_scale(tree, s):
  return {k: v * s for k, v in tree.items()}


def test_scheme_paths_are_never_local(empty_cwd):
  assert not io.is_local(io.as_path("gs://bucket/run"))
  assert os.fspath(io.as_path("gs://bucket/run")) == "gs://bucket/run"
  # A scheme no backend knows is refused; never written as ./foo:/bucket/...
  with pytest.raises(UserError, match="unsupported scheme foo://"):
    io.save_npz("foo://bucket/x.npz", a=np.zeros(2))


# The command line in a fresh interpreter where gcsfs cannot be imported, as
# after `pip install .` without the gcs extra.
_NO_GCSFS = ("import sys; sys.modules['gcsfs'] = None; "
             "from var_jax import cli; sys.exit(cli.main(sys.argv[1:]))")


@pytest.mark.parametrize("out,expect", [
    ("gs://bucket/x.png", "gs:// paths need gcsfs: pip install gcsfs "
     "(from a checkout: pip install '.[gcs]')"),
    ("foo://bucket/x.png", "unsupported scheme foo://"),
])
def test_cli_names_a_missing_backend_in_one_line(empty_cwd, out, expect):
  p = subprocess.run([sys.executable, "-c", _NO_GCSFS, "sample", "--out", out],
                     capture_output=True, text=True, timeout=300)
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
  assert lines[0].startswith("var-jax sample: error: ") and expect in lines[0]
