"""Data pipeline: augmentation, sources, determinism, resume, sharding, errors."""

import io
import logging
import sys

import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from var_jax.data import DataError, make_loader
from var_jax.data import augment

RES = 16
CLASSES = ("ant", "bee", "cat")
# Image sizes per class: odd shapes exercise the resize/crop arithmetic.
SIZES = ((40, 30), (25, 50), (33, 33), (64, 20), (21, 47))


def _write(path, size, seed, fmt):
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(arr).save(path, format=fmt)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """root/{train,val}/<class>/ with PNG/JPEG files and one corrupt image."""
  root = tmp_path_factory.mktemp("imgs")
  seed = 0
  for split, n in (("train", 5), ("val", 2)):
    for c in CLASSES:
      d = root / split / c
      d.mkdir(parents=True)
      for i in range(n):
        seed += 1
        ext, fmt = ((".png", "PNG"), (".JPEG", "JPEG"))[i % 2]
        _write(d / f"{c}_{i}{ext}", SIZES[i % len(SIZES)], seed, fmt)
      (d / "notes.txt").write_text("not an image")
  (root / "train" / "bee" / "zz_broken.jpg").write_bytes(b"\xff\xd8garbage")
  return root


def _spec(root):
  return f"folder:{root}"


def _take(loader, n):
  out = [next(loader) for _ in range(n)]
  loader.close()
  return out


def _same(a, b):
  return all(np.array_equal(x["images"], y["images"])
             and np.array_equal(x["labels"], y["labels"]) for x, y in zip(a, b))


def _kw(**kw):
  base = dict(split="train", resolution=RES, global_batch=4, seed=0,
              hflip=True, num_workers=2)
  base.update(kw)
  return base


def test_shapes_dtypes_range(folder):
  ld = make_loader(_spec(folder), **_kw())
  assert ld.num_classes == 3 and ld.num_examples == 16  # 15 + corrupt file.
  assert ld.steps_per_epoch == 4
  for b in _take(ld, 3):
    assert b["images"].shape == (4, RES, RES, 3)
    assert b["images"].dtype == np.float32
    assert b["labels"].shape == (4,) and b["labels"].dtype == np.int32
    assert b["images"].min() >= -1.0 and b["images"].max() <= 1.0
    assert set(b["labels"].tolist()) <= {0, 1, 2}


def test_same_seed_same_batches_other_seed_differs(folder):
  a = _take(make_loader(_spec(folder), **_kw(seed=3)), 5)
  b = _take(make_loader(_spec(folder), **_kw(seed=3, num_workers=0)), 5)
  c = _take(make_loader(_spec(folder), **_kw(seed=4)), 5)
  assert _same(a, b)  # Thread count must not matter either.
  assert not _same(a, c)


def test_resume_matches_uninterrupted(folder):
  full = _take(make_loader(_spec(folder), **_kw(seed=1)), 9)  # > 2 epochs.
  resumed = make_loader(_spec(folder), **_kw(seed=1, start_step=3))
  assert resumed.step == 3
  assert _same(full[3:], _take(resumed, 6))


def test_two_processes_make_one(folder):
  one = _take(make_loader(_spec(folder), **_kw(seed=2)), 6)
  p0 = _take(make_loader(_spec(folder), **_kw(
      seed=2, process_index=0, process_count=2)), 6)
  p1 = _take(make_loader(_spec(folder), **_kw(
      seed=2, process_index=1, process_count=2)), 6)
  joined = [{k: np.concatenate([x[k], y[k]]) for k in x} for x, y in zip(p0, p1)]
  assert p0[0]["images"].shape[0] == 2
  assert _same(one, joined)


def test_epoch_is_a_permutation(folder):
  ld = make_loader(_spec(folder), **_kw(seed=5))
  idx = np.concatenate([ld.global_indices(s) for s in range(ld.steps_per_epoch)])
  assert sorted(idx.tolist()) == list(range(16))
  assert not np.array_equal(ld.global_indices(0), ld.global_indices(4))
  ld.close()


def test_corrupt_image_skipped_and_counted(folder, caplog):
  with caplog.at_level(logging.WARNING, logger="var_jax.data.loader"):
    ld = make_loader(_spec(folder), **_kw(num_epochs=1, num_workers=0))
    batches = list(ld)
  assert len(batches) == 4
  assert ld.stats() == {"corrupt_skipped": 1, "corrupt_unique": 1}
  assert "zz_broken.jpg" in caplog.text


def test_val_split_is_center_crop_without_randomness(folder):
  kw = _kw(split="val", global_batch=3, shuffle=False, num_epochs=1)
  a = list(make_loader(_spec(folder), **kw))
  b = list(make_loader(_spec(folder), **{**kw, "seed": 9}))
  assert len(a) == 2 and _same(a, b)  # Seed only affects order and aug.
  img = Image.open(folder / "val" / "ant" / "ant_0.png").convert("RGB")
  want = augment.augment(img, RES, train=False, hflip=False, rng=None)
  np.testing.assert_array_equal(a[0]["images"][0], want)


def test_resize_and_crop_rules():
  img = Image.new("RGB", (40, 20))
  assert augment.resize_shorter(img, 18).size == (36, 18)
  assert augment.resize_shorter(Image.new("RGB", (21, 47)), 18).size == (18, 40)
  assert augment.mid_resolution(256) == 288
  assert augment.center_crop_box(36, 18, 16) == (1, 10)
  x = augment.to_pm1(np.array([[[0, 255, 51]]], np.uint8))
  np.testing.assert_array_equal(x, np.float32([[[-1, 1, 51 / 255 * 2 - 1]]]))


def test_train_aug_deterministic_given_rng():
  img = Image.fromarray(np.random.default_rng(0).integers(
      0, 256, (30, 50, 3), dtype=np.uint8))
  f = lambda s: augment.augment(img, RES, train=True, hflip=True,
                                rng=np.random.default_rng(s))
  np.testing.assert_array_equal(f(1), f(1))
  assert any(not np.array_equal(f(0), f(s)) for s in range(1, 5))


def test_decode_corrupt_raises():
  with pytest.raises(augment.CorruptImageError):
    augment.decode_image(b"\x89PNG\r\n\x1a\nbroken")


def test_flat_folder_is_split_root(tmp_path):
  for c in CLASSES[:2]:
    (tmp_path / c).mkdir()
    for i in range(2):
      _write(tmp_path / c / f"{i}.png", (20, 20), i, "PNG")
  ld = make_loader(f"folder:{tmp_path}", **_kw())
  assert ld.num_classes == 2 and ld.num_examples == 4
  ld.close()


@pytest.mark.parametrize("case, match", [
    ("missing", "data directory not found"),
    ("no_split", "split directory missing"),
    ("no_classes", "no class folders"),
    ("empty_class", "'bee'"),
    ("no_images", "no images in"),
    ("scheme", "unknown data spec"),
    ("indivisible", "not divisible"),
])
def test_errors(tmp_path, case, match):
  spec, kw = f"folder:{tmp_path}", _kw()
  if case == "missing":
    spec = f"folder:{tmp_path / 'nope'}"
  elif case == "no_split":
    (tmp_path / "train" / "a").mkdir(parents=True)
    kw["split"] = "val"
  elif case == "no_classes":
    (tmp_path / "train").mkdir()
  elif case in ("empty_class", "no_images"):
    for c in ("ant", "bee"):
      (tmp_path / "train" / c).mkdir(parents=True)
    if case == "empty_class":
      _write(tmp_path / "train" / "ant" / "0.png", (20, 20), 0, "PNG")
  elif case == "scheme":
    spec = f"hdf5:{tmp_path}"
  elif case == "indivisible":
    spec, kw["process_count"] = "digits", 3
  with pytest.raises(DataError, match=match):
    make_loader(spec, **kw)


def test_digits():
  kw = dict(resolution=64, global_batch=8, seed=0, num_workers=2)
  tr = make_loader("digits", split="train", **kw)
  va = make_loader("digits", split="val", **kw)
  assert tr.num_classes == va.num_classes == 10
  assert tr.num_examples + va.num_examples == 1797
  assert not set(tr.source.indices) & set(va.source.indices)
  b = _take(tr, 2)[1]
  assert b["images"].shape == (8, 64, 64, 3) and b["images"].dtype == np.float32
  assert b["images"].min() >= -1 and b["images"].max() <= 1
  assert np.array_equal(b["images"][..., 0], b["images"][..., 2])  # Gray.
  assert b["labels"].dtype == np.int32
  va.close()
  shifted = _take(make_loader("digits", split="train", max_shift=4, **kw), 1)
  assert shifted[0]["images"].shape == (8, 64, 64, 3)


def test_digits_without_scikit_learn_says_how_to_install(monkeypatch):
  # None in sys.modules makes the import fail as if it were not installed.
  for name in ("sklearn", "sklearn.datasets", "sklearn.svm"):
    monkeypatch.setitem(sys.modules, name, None)
  hint = (r"needs scikit-learn: pip install scikit-learn \(from a checkout: "
          r"pip install '\.\[digits\]'\)$")
  with pytest.raises(DataError, match="^the digits data source " + hint):
    make_loader("digits", split="train", resolution=64, global_batch=8,
                seed=0)
  from var_jax.data import digits_eval
  with pytest.raises(DataError, match="^the digits classifier check " + hint):
    digits_eval.train_classifier()


# --- TFDS: the read path needs no TensorFlow ---------------------------------

@pytest.mark.parametrize("name, num_classes", [("imagenet2012", 1000),
                                               ("mnist", 10)])
def test_tfds_mock_data(name, num_classes):
  with tfds.testing.mock_data(num_examples=12):
    ld = make_loader(f"tfds:{name}", **_kw(global_batch=4))
    assert ld.num_classes == num_classes and ld.num_examples == 12
    batches = _take(ld, 4)  # Crosses an epoch (3 steps each).
  for b in batches:
    assert b["images"].shape == (4, RES, RES, 3)
    assert b["images"].dtype == np.float32 and b["labels"].dtype == np.int32
    assert b["images"].min() >= -1 and b["images"].max() <= 1


class VarJaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """A 3-class toy dataset of PNG bytes (encoding arrays would need TF)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=3)})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(10),
            "validation": self._generate_examples(4)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      buf = io.BytesIO()
      arr = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
      Image.fromarray(arr).save(buf, format="PNG")
      yield i, {"image": buf.getvalue(), "label": i % 3}


def test_tfds_local_builder_prepares_and_reads(tmp_path):
  kw = _kw(global_batch=2, data_dir=str(tmp_path))
  ld = make_loader("tfds:var_jax_tiny_images", **kw)
  assert ld.num_classes == 3 and ld.num_examples == 10
  assert (tmp_path / "var_jax_tiny_images" / "1.0.0").is_dir()
  a = _take(ld, 6)
  b = _take(make_loader("tfds:var_jax_tiny_images", **kw, start_step=2), 4)
  assert _same(a[2:], b)
  va = make_loader("tfds:var_jax_tiny_images", **{**kw, "split": "val"})
  assert va.num_examples == 4
  va.close()


def test_tfds_imagenet_missing_manual_files(tmp_path):
  with pytest.raises(DataError, match="ILSVRC2012_img_train.tar"):
    make_loader("tfds:imagenet2012", **_kw(data_dir=str(tmp_path),
                                           manual_dir=str(tmp_path)))
