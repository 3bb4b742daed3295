"""Cloud paths (`gs://...`) go through etils.epath and never become local.

Tests have no network, so `gs://BUCKET/...` is served by etils' own test
backend (`epath.testing.mock_epath`) from a local folder standing in for
the bucket; the code under test sees only `gs://` paths. The claims: every
reader and writer of ours reaches the bucket through epath, nothing named
`gs:` appears in the working directory, no temporary file is left in the
bucket.
"""

import os
import sys

import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing
from PIL import Image

from var_jax import checkpoint, cli
from var_jax import io as var_io
from var_jax.convert.pth import read_pth
from var_jax.data.decode import decode_image
from var_jax.data.sources import AugConfig, FolderSource, TokenSource
from var_jax.errors import CheckpointError, UserError


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """(gs:// prefix, local folder holding the bucket); cwd is a clean dir."""
  store = tmp_path / "store"
  (store / "bkt").mkdir(parents=True)
  work = tmp_path / "cwd"
  work.mkdir()
  monkeypatch.chdir(work)

  def local(p):
    s = os.fspath(p)
    return os.fspath(store) + "/" + s[5:] if s.startswith("gs://") else s

  one = lambda orig, p, *a, **k: orig(local(p), *a, **k)
  two = lambda orig, a_, b_, *a, **k: orig(local(a_), local(b_), *a, **k)
  fns = dict(open=one, exists=one, isdir=one, listdir=one, makedirs=one,
             mkdir=one, remove=one, rmtree=one, stat=one, glob=one,
             walk=one, rename=two, replace=two, copy=two)
  with epath_testing.mock_epath(**fns):
    yield "gs://bkt", store / "bkt"
  assert os.listdir(work) == []  # No local "gs:" directory, ever.


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, fs in os.walk(root) for f in fs)


def test_writers_reach_the_bucket(bucket):
  gs, store = bucket
  var_io.save_png(f"{gs}/out/grid.png", np.zeros((4, 4, 3), np.uint8))
  var_io.save_npz(f"{gs}/out/x.npz", a=np.arange(3))
  var_io.write_text(f"{gs}/out/c.json", "{}")
  with var_io.atomic_dir(f"{gs}/model") as tmp:
    assert not var_io.is_local(tmp)
    var_io.write_text(tmp / "config.json", "{}")
  assert _files(store) == ["model/config.json", "out/c.json", "out/grid.png",
                           "out/x.npz"]
  assert np.load(store / "out" / "x.npz")["a"].tolist() == [0, 1, 2]
  assert var_io.as_path(f"{gs}/out/grid.png").exists()


def test_readers_reach_the_bucket(bucket, golden_dir):
  gs, store = bucket
  for k, color in enumerate(((250, 0, 0), (0, 0, 250))):
    (store / "data" / f"c{k}").mkdir(parents=True)
    Image.new("RGB", (8, 8), color).save(store / "data" / f"c{k}" / "x.png")
  (store / "data" / "c0" / "notes.txt").write_text("x")
  src = FolderSource(f"{gs}/data", "train", AugConfig(8, train=False))
  assert src.paths == [f"{gs}/data/c0/x.png", f"{gs}/data/c1/x.png"]
  assert src.labels.tolist() == [0, 1]
  assert src.listing.skipped == ("c0/notes.txt",)
  x, y = src.example(1, np.random.default_rng(0))
  assert y == 1 and x[..., 2].min() > 0.9
  assert np.asarray(decode_image(f"{gs}/data/c0/x.png"))[0, 0].tolist() == [
      250, 0, 0]
  np.savez(store / "tok.npz", tokens=np.zeros((2, 5), np.int32),
           labels=np.array([0, 1], np.int32), patch_nums=np.array([1, 2]),
           num_classes=np.int32(2))
  assert len(TokenSource(f"{gs}/tok.npz")) == 2
  (store / "vae.pth").write_bytes((golden_dir / "vae_tiny.pth").read_bytes())
  got = read_pth(f"{gs}/vae.pth")
  want = read_pth(golden_dir / "vae_tiny.pth")
  assert set(got) == set(want)
  np.testing.assert_array_equal(got["encoder.conv_in.weight"],
                                want["encoder.conv_in.weight"])


def test_missing_model_dir_in_the_bucket_is_one_error(bucket):
  gs, store = bucket
  with pytest.raises(CheckpointError, match="no config.json"):
    checkpoint.load_model(f"{gs}/nothing")
  (store / "m").mkdir()
  (store / "m" / "config.json").write_text('{"vae": null}')
  with pytest.raises(CheckpointError, match="no VQVAE weights"):
    checkpoint.load_model(f"{gs}/m")
  assert _files(store) == ["m/config.json"]


def test_encode_writes_its_tokens_to_the_bucket(bucket, capsys):
  gs, store = bucket
  imgs = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), np.uint8)
  (store / "in").mkdir()
  np.save(store / "in" / "imgs.npy", imgs)
  code = cli.main(["--no-compile-cache", "encode", "--images",
                   f"{gs}/in/imgs.npy", "--out", f"{gs}/out/tok.npz"])
  _, err = capsys.readouterr()
  assert code == 0, err
  assert _files(store) == ["in/imgs.npy", "out/tok.npz"]
  z = np.load(store / "out" / "tok.npz")
  assert z["idx_0"].shape == (2, 1)
  assert isinstance(var_io.as_path(f"{gs}/x"), epath.Path)


@pytest.mark.parametrize("scheme,package,hint", [
    ("gs", "gcsfs",
     "pip install gcsfs (from a checkout: pip install '.[gcs]')"),
    ("s3", "s3fs", "pip install s3fs")])
def test_a_remote_path_without_its_backend_is_one_line(
    tmp_path, monkeypatch, capsys, scheme, package, hint):
  # None in sys.modules is what find_spec reports as "not installed".
  monkeypatch.setitem(sys.modules, package, None)
  monkeypatch.setenv("EPATH_USE_TF", "0")
  monkeypatch.chdir(tmp_path)
  out = f"{scheme}://bkt/x.npz"
  with pytest.raises(UserError) as e:
    var_io.save_npz(out, a=np.zeros(1))
  assert str(e.value) == f"{out}: {scheme}:// paths need {package}: {hint}"
  # From the CLI: one line and exit 2, before the images are even read.
  code = cli.main(["encode", "--images", "missing.npy", "--out", out])
  _, err = capsys.readouterr()
  assert code == 2 and err == f"var-jax encode: error: {e.value}\n"
  assert os.listdir(tmp_path) == []


def test_an_unknown_scheme_is_one_line(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError, match=r"^foo://bkt/x.npz: unsupported scheme "
                     r"foo:// \(supported: local paths, gs://, s3://\)$"):
    var_io.save_npz("foo://bkt/x.npz", a=np.zeros(1))
  code = cli.main(["convert", "--vae", "foo://bkt/vae.pth", "--out",
                   str(tmp_path / "m")])
  _, err = capsys.readouterr()
  assert code == 2 and err.count("\n") == 1 and "unsupported scheme" in err
  assert os.listdir(tmp_path) == []


def test_unreachable_cloud_storage_is_one_user_error():
  """A backend's own failure (aiohttp, google-auth) on a gs:// path becomes
  one UserError naming the path; local errors pass through unchanged."""
  from var_jax import io as var_io
  from var_jax.errors import UserError

  class ClientConnectorDNSError(OSError):
    pass

  with pytest.raises(UserError) as info:
    with var_io.reachable("gs://bucket/x.png", "--out"):
      raise ClientConnectorDNSError(
          "Cannot connect to host storage.googleapis.com:443\nssl:default")
  msg = str(info.value)
  assert msg.startswith("--out gs://bucket/x.png: cannot reach the storage")
  assert "storage.googleapis.com:443 ssl:default" in msg and "\n" not in msg
  with pytest.raises(ClientConnectorDNSError):
    with var_io.reachable("/tmp/x.png", "--out"):
      raise ClientConnectorDNSError("local")
