"""Random-access example sources: image folders, TFDS (array_record), digits.

A source is a sized, thread-safe random-access object with `num_classes` and
`example(index, rng) -> (img_HWC float32 in [-1, 1], label)`; the loader owns
ordering, sharding and batching. Sources raise `CorruptImageError` for an
undecodable example so the loader can skip and count it.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from var_jax.data import augment
from var_jax.data.augment import CorruptImageError
from var_jax.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# File names of the ImageNet-2012 manual download that TFDS prepares from.
_IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


@dataclasses.dataclass(frozen=True)
class AugConfig:
  """How raw examples become model inputs."""

  resolution: int
  train: bool
  hflip: bool = False
  mid_reso: float = augment.MID_RESO
  max_shift: int = 0  # Digits only: random translation in output pixels.


class FolderSource:
  """`root/<class>/**/*.{jpg,...}` with classes sorted by name (torchvision)."""

  def __init__(self, path: str, split: str, aug: AugConfig):
    root = _split_root(path, split)
    self.classes = sorted(
        e.name for e in os.scandir(root)
        if e.is_dir() and not e.name.startswith("."))
    if not self.classes:
      raise DataError(f"no class folders in {root}")
    self.paths: list[str] = []
    labels, empty = [], []
    for label, name in enumerate(self.classes):
      files = _list_images(os.path.join(root, name))
      if not files:
        empty.append(name)
      self.paths.extend(files)
      labels.extend([label] * len(files))
    if not self.paths:
      raise DataError(f"no images in {root} (extensions "
                      f"{', '.join(IMG_EXTENSIONS)})")
    if empty:
      # Silently dropping a class would shift every later label id.
      raise DataError(f"class folder(s) without images in {root}: "
                      f"{', '.join(repr(n) for n in empty)}")
    self.labels = np.asarray(labels, np.int32)
    self.root = root
    self.num_classes = len(self.classes)
    self._aug = aug

  def __len__(self) -> int:
    return len(self.paths)

  def example(self, index: int, rng: np.random.Generator):
    img = augment.decode_image(self.paths[index])
    a = self._aug
    img_HWC = augment.augment(img, a.resolution, train=a.train, hflip=a.hflip,
                              rng=rng, mid_reso=a.mid_reso)
    return img_HWC, int(self.labels[index])

  def describe(self, index: int) -> str:
    return self.paths[index]


def _split_root(path: str, split: str) -> str:
  """PATH/<split> in the official layout, else PATH itself."""
  if not os.path.isdir(path):
    raise DataError(f"data directory not found: {path}")
  cand = os.path.join(path, split)
  if os.path.isdir(cand):
    return cand
  if any(os.path.isdir(os.path.join(path, s)) for s in ("train", "val")):
    raise DataError(f"split directory missing: {cand}")
  return path


def _list_images(class_dir: str) -> list[str]:
  """Image files under `class_dir`, recursively, in torchvision's order."""
  out = []
  for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
    for fname in sorted(fnames):
      if fname.lower().endswith(IMG_EXTENSIONS):
        out.append(os.path.join(dirpath, fname))
  return out


class DigitsSource:
  """scikit-learn's bundled 8x8 digits; every 10th image is the 'val' split."""

  def __init__(self, split: str, aug: AugConfig):
    from sklearn.datasets import load_digits  # Lazy: sklearn is slow to import.
    if split not in ("train", "val"):
      raise DataError(f"digits has splits 'train' and 'val', not {split!r}")
    data = load_digits()
    held_out = np.arange(len(data.target)) % 10 == 0
    keep = held_out if split == "val" else ~held_out
    self.indices = np.flatnonzero(keep)  # Positions in the full 1797 set.
    self.images_NHW = data.images[keep]
    self.labels = data.target[keep].astype(np.int32)
    self.num_classes = 10
    self._aug = aug

  def __len__(self) -> int:
    return len(self.labels)

  def example(self, index: int, rng: np.random.Generator):
    a = self._aug
    img_HWC = augment.digits_to_image(
        self.images_NHW[index], a.resolution,
        max_shift=a.max_shift if a.train else 0, rng=rng)
    if a.train and a.hflip and rng.random() < 0.5:
      img_HWC = img_HWC[:, ::-1]
    return img_HWC, int(self.labels[index])

  def describe(self, index: int) -> str:
    return f"digits[{self.indices[index]}]"


class TfdsSource:
  """A TFDS dataset read through its array_record random-access data source.

  Reading needs no TensorFlow; preparing (download_and_prepare) usually does,
  e.g. for imagenet2012, so prepare once where TensorFlow is installed.
  """

  def __init__(self, name: str, split: str, aug: AugConfig, *,
               data_dir: str | None = None, manual_dir: str | None = None):
    import tensorflow_datasets as tfds  # Lazy: heavy import.
    if data_dir is not None and not os.path.isdir(data_dir):
      raise DataError(f"data directory not found: {data_dir}")
    try:
      builder = tfds.builder(name, data_dir=data_dir,
                             file_format="array_record")
    except Exception as e:  # DatasetNotFoundError and friends.
      raise DataError(f"tfds:{name}: {_first_line(e)}") from e
    if not builder.is_prepared():
      _prepare(tfds, builder, name, manual_dir)
    # TFDS names the held-out split 'validation'; accept the official 'val'.
    tfds_split = "validation" if split == "val" else split
    try:
      self._ds = builder.as_data_source(split=tfds_split)
    except Exception as e:
      raise DataError(
          f"tfds:{name} split {tfds_split!r} unavailable (array_record "
          f"needed): {_first_line(e)}") from e
    label = builder.info.features["label"]
    self.num_classes = int(label.num_classes)
    self.name = name
    self._aug = aug

  def __len__(self) -> int:
    return len(self._ds)

  def example(self, index: int, rng: np.random.Generator):
    try:
      record = self._ds[index]
    except Exception as e:  # TFDS wraps decode failures in varied types.
      raise CorruptImageError(f"{type(e).__name__}: {e}") from e
    img = augment.decode_image(np.asarray(record["image"]))
    a = self._aug
    img_HWC = augment.augment(img, a.resolution, train=a.train, hflip=a.hflip,
                              rng=rng, mid_reso=a.mid_reso)
    return img_HWC, int(record["label"])

  def describe(self, index: int) -> str:
    return f"tfds:{self.name}[{index}]"


def _prepare(tfds, builder, name: str, manual_dir: str | None) -> None:
  """download_and_prepare, turning its failures into one-line DataErrors."""
  # GCS holds TFRecord builds, useless for random access: always build locally.
  config = tfds.download.DownloadConfig(manual_dir=manual_dir,
                                        try_download_gcs=False)
  try:
    builder.download_and_prepare(download_config=config)
  except Exception as e:
    root = getattr(builder, "_data_dir_root", None) or "~/tensorflow_datasets"
    mdir = manual_dir or os.path.join(root, "downloads", "manual")
    if name.split("/")[0].split(":")[0] == "imagenet2012":
      missing = [f for f in _IMAGENET_MANUAL_FILES
                 if not os.path.exists(os.path.join(mdir, f))]
      if missing:
        raise DataError(
            f"tfds:{name} is not prepared under {builder.data_dir} and its "
            f"manual files are missing from {mdir}: {', '.join(missing)}"
        ) from e
    if isinstance(e, ModuleNotFoundError) and "tensorflow" in str(e):
      raise DataError(
          f"preparing tfds:{name} needs TensorFlow, which is not installed; "
          "prepare it once where it is (array_record format) and pass that "
          "data_dir") from e
    raise DataError(f"preparing tfds:{name} failed: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}"


class TokenSource:
  """A pre-tokenized cache (`var-jax tokenize`): token ids instead of images.

  The file holds `tokens` int32 (N, L), `labels` int32 (N,), `patch_nums`
  and `num_classes`. Splits are whatever was tokenized, so `split` is
  ignored; augmentation was fixed when the cache was written.
  """

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise DataError(f"token cache {path} not found (write one with "
                      "`var-jax tokenize`)")
    try:
      with np.load(path) as z:
        self.tokens_NL = np.asarray(z["tokens"], np.int32)
        self.labels = np.asarray(z["labels"], np.int32)
        self.patch_nums = tuple(int(v) for v in z["patch_nums"])
        self.num_classes = int(z["num_classes"])
    except (OSError, ValueError, KeyError) as e:
      raise DataError(f"{path} is not a token cache: {_first_line(e)}"
                      ) from None
    if (self.tokens_NL.ndim != 2 or len(self.labels) != len(self.tokens_NL)
        or self.tokens_NL.shape[1] != sum(p * p for p in self.patch_nums)):
      raise DataError(f"{path}: tokens {self.tokens_NL.shape} and labels "
                      f"{self.labels.shape} do not fit scales "
                      f"{self.patch_nums}")
    self.path = path

  def __len__(self) -> int:
    return len(self.labels)

  def example(self, index: int, rng: np.random.Generator):
    del rng
    return self.tokens_NL[index], int(self.labels[index])

  def describe(self, index: int) -> str:
    return f"{self.path}[{index}]"


def open_source(spec: str, *, split: str, aug: AugConfig,
                data_dir: str | None = None, manual_dir: str | None = None):
  """Parses `folder:PATH`, `tfds:NAME`, `tokens:PATH.npz` or `digits`."""
  scheme, sep, rest = spec.partition(":")
  if scheme == "tokens" and sep and rest:
    return TokenSource(os.path.expanduser(rest))
  if scheme == "digits" and not rest:
    return DigitsSource(split, aug)
  if scheme == "folder" and sep and rest:
    return FolderSource(os.path.expanduser(rest), split, aug)
  if scheme == "tfds" and sep and rest:
    return TfdsSource(rest, split, aug, data_dir=data_dir,
                      manual_dir=manual_dir)
  raise DataError(
      f"unknown data spec {spec!r}: expected folder:PATH, tfds:NAME, "
      "tokens:PATH.npz or digits")
