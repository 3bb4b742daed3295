"""The torch-free .pth reader on real golden files and crafted/hostile ones."""

import os
import zipfile

import ml_dtypes
import numpy as np
import pytest
from pth_writer import write_hostile_pth, write_pth, write_view_pth

from var_jax.models.var.config import PATCH_NUMS_256
from var_jax.convert.pth import PthError, read_pth, read_state_dict


def test_golden_state_dicts(golden_dir):
  var = read_pth(golden_dir / "var_tiny.pth")
  assert var["class_emb.weight"].shape == (11, 128)
  assert var["blocks.0.attn.mat_qkv.weight"].shape == (384, 128)
  assert var["class_emb.weight"].dtype == np.float32
  lvl = np.concatenate([np.full(pn * pn, i) for i, pn in enumerate(PATCH_NUMS_256)])
  np.testing.assert_array_equal(var["lvl_1L"].reshape(-1), lvl)
  assert var["lvl_1L"].dtype == np.int64
  bias = var["attn_bias_for_masking"].reshape(680, 680)
  np.testing.assert_array_equal(bias == 0, lvl[:, None] >= lvl[None, :])
  assert np.all(np.isneginf(bias[bias != 0]))
  vae = read_pth(golden_dir / "vae_tiny.pth")
  assert vae["quantize.embedding.weight"].shape == (256, 16)
  assert vae["quantize.ema_vocab_hit_SV"].shape == (10, 256)
  assert len(vae) == 324
  assert len(read_pth(golden_dir / "var_tiny_saln512.pth")) == 37


def test_dtypes_nesting_and_scalars(tmp_path):
  a = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
  sd = {"w": a, "h": a.astype(np.float16), "b": a.astype(ml_dtypes.bfloat16),
        "i": np.arange(5, dtype=np.int64), "s": np.array(3.5, np.float32),
        "m": np.array([True, False])}
  write_pth(tmp_path / "x.pth", {"trainer": {"var_wo_ddp": sd}, "epoch": 3})
  got = read_pth(tmp_path / "x.pth")
  assert got["epoch"] == 3
  for k, v in sd.items():
    r = got["trainer"]["var_wo_ddp"][k]
    assert r.dtype == v.dtype and r.shape == v.shape, k
    np.testing.assert_array_equal(np.asarray(r, np.float64),
                                  np.asarray(v, np.float64))
  flat = read_state_dict(tmp_path / "x.pth")
  assert set(flat) == {f"trainer.var_wo_ddp.{k}" for k in sd}


def test_strided_view_with_offset(tmp_path):
  storage = np.arange(100, dtype=np.float32)
  write_view_pth(tmp_path / "v.pth", "v", storage, 5, (3, 4), (1, 10))
  want = np.lib.stride_tricks.as_strided(storage[5:], (3, 4), (4, 40))
  np.testing.assert_array_equal(read_pth(tmp_path / "v.pth")["v"], want)


def test_view_past_storage_end_is_refused(tmp_path):
  write_view_pth(tmp_path / "v.pth", "v", np.arange(10, dtype=np.float32), 5,
                 (3, 4), (1, 10))
  with pytest.raises(PthError, match="corrupt"):
    read_pth(tmp_path / "v.pth")


@pytest.mark.parametrize("module,name", [("os", "system"),
                                         ("builtins", "eval"),
                                         ("subprocess", "Popen")])
def test_hostile_globals_refused(tmp_path, module, name):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  write_hostile_pth(path, module, name, f"echo pwned > {marker}")
  with pytest.raises(PthError, match=f"global {module}.{name}"):
    read_pth(path)
  assert not marker.exists()


def test_truncated_file(golden_dir, tmp_path):
  data = (golden_dir / "var_tiny.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
  with pytest.raises(PthError, match="cut.pth"):
    read_pth(tmp_path / "cut.pth")


def test_not_a_checkpoint(tmp_path):
  (tmp_path / "a.pth").write_text("hello world")
  with pytest.raises(PthError, match="not a PyTorch checkpoint"):
    read_pth(tmp_path / "a.pth")
  with pytest.raises(PthError, match="no such file"):
    read_pth(tmp_path / "missing.pth")


def test_zip_without_pickle_or_storage(tmp_path):
  with zipfile.ZipFile(tmp_path / "z.pth", "w") as zf:
    zf.writestr("archive/version", "3\n")
  with pytest.raises(PthError, match="without data.pkl"):
    read_pth(tmp_path / "z.pth")
  write_pth(tmp_path / "s.pth", {"w": np.ones(3, np.float32)})
  with zipfile.ZipFile(tmp_path / "s.pth") as src, \
      zipfile.ZipFile(tmp_path / "s2.pth", "w") as dst:
    for n in src.namelist():
      if "/data/" not in n:
        dst.writestr(n, src.read(n))
  with pytest.raises(PthError, match="storage record 0 is missing"):
    read_pth(tmp_path / "s2.pth")


def test_legacy_format_refused(tmp_path):
  import pickle
  with open(tmp_path / "old.pth", "wb") as fh:
    pickle.dump(0x1950A86A20F9469CFC6C, fh, protocol=2)
    pickle.dump(1001, fh, protocol=2)
  with pytest.raises(PthError, match="legacy pre-1.6"):
    read_pth(tmp_path / "old.pth")
  assert os.path.exists(tmp_path / "old.pth")
