"""Random-access example sources: image folders, TFDS (array_record), digits.

A source is a sized, thread-safe random-access object with `num_classes` and
`example(index, rng) -> (img_HWC float32 in [-1, 1], label)`; the loader owns
ordering, sharding and batching. Sources raise `CorruptImageError` for an
undecodable example so the loader can skip and count it.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import logging
import os
import zipfile

import numpy as np

from var_jax.data import augment
from var_jax.data.augment import CorruptImageError
from var_jax.errors import DataError

log = logging.getLogger(__name__)

# torchvision's IMG_EXTENSIONS (the official pipeline's ImageFolder), matched
# case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif",
                  ".tiff", ".webp")
# File names of the ImageNet-2012 manual download that TFDS prepares from.
_IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
# Skipped files named in the warning before "... and N more".
_NAMED_SKIPS = 5


@dataclasses.dataclass(frozen=True)
class AugConfig:
  """How raw examples become model inputs."""

  resolution: int
  train: bool
  hflip: bool = False
  mid_reso: float = augment.MID_RESO
  max_shift: int = 0  # Digits only: random translation in output pixels.


@dataclasses.dataclass(frozen=True)
class FolderListing:
  """What `list_folder` found.

  Attributes:
    classes: class folder names, sorted (label = position).
    paths: image files (as the user sees them, under their class folder).
    labels: int32 (N,) label of each path.
    skipped: other visible files (relative to the root), not used.
    shared: image files found under more than one class folder.
  """

  classes: tuple[str, ...]
  paths: tuple[str, ...]
  labels: np.ndarray
  skipped: tuple[str, ...]
  shared: int


def _is_image_name(name: str) -> bool:
  return name.lower().endswith(IMG_EXTENSIONS)


def _inside(path: str, root: str) -> bool:
  return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk_local(class_dir: str, rel: str, data_root: str,
                skipped: list) -> list[tuple]:
  """(dirpath, [(name, key, is_link)]) of every directory a user sees.

  Follows directory symlinks that lead out of the data root (classes kept
  elsewhere) or stay inside this class folder; a link into the root or
  another class folder is reported, not followed (it would list the same
  images under a second label, or loop). Each real directory is visited
  once; hidden entries (names starting with '.', e.g. .ipynb_checkpoints,
  macOS ._* files) are not part of the data.
  """
  found, seen_dirs = [], set()
  class_real = os.path.realpath(class_dir)
  stack = [(class_dir, rel)]
  while stack:
    d, r = stack.pop()
    real = os.path.realpath(d)
    if real in seen_dirs:
      continue
    seen_dirs.add(real)
    names = []
    try:
      entries = list(os.scandir(d))
    except OSError as e:
      raise DataError(f"cannot list {d}: {e.strerror or e}") from None
    for e in entries:
      if e.name.startswith("."):
        continue
      if e.is_dir():
        target = os.path.realpath(e.path)
        if (e.is_symlink() and _inside(target, data_root)
            and not _inside(target, class_real)):
          skipped.append(f"{r}/{e.name} (link back into the data folder)")
        else:
          stack.append((e.path, f"{r}/{e.name}"))
      elif not e.is_file():
        skipped.append(f"{r}/{e.name} (broken link)")
      elif _is_image_name(e.name):
        # A link's key is its target; a plain file's, its real directory.
        link = e.is_symlink()
        key = os.path.realpath(e.path) if link else os.path.join(real, e.name)
        names.append((e.name, key, link))
      else:
        skipped.append(f"{r}/{e.name}")
    found.append((d, sorted(names)))
  return found


def _walk_remote(class_dir, rel: str, data_root, skipped: list) -> list[tuple]:
  """`_walk_local` for `gs://` and other epath backends (no links there)."""
  del data_root
  found, stack = [], [(class_dir, rel)]
  while stack:
    d, r = stack.pop()
    names = []
    for e in d.iterdir():
      if e.name.startswith("."):
        continue
      if e.is_dir():
        stack.append((e, f"{r}/{e.name}"))
      elif _is_image_name(e.name):
        names.append((e.name, os.fspath(e), False))
      else:
        skipped.append(f"{r}/{e.name}")
    found.append((os.fspath(d), sorted(names)))
  return found


def _once(dirs, local: bool) -> list[tuple[str, str]]:
  """(path, key) in walk order, one per key; a plain file beats a link."""
  entries = [(os.path.join(d, n) if local else f"{d}/{n}", key, link)
             for d, names in sorted(dirs) for n, key, link in names]
  chosen = {}
  for i, (_, key, link) in enumerate(entries):
    j = chosen.get(key)
    if j is None or (entries[j][2] and not link):
      chosen[key] = i
  return [(p, key) for i, (p, key, _) in enumerate(entries)
          if chosen[key] == i]


def list_folder(root) -> FolderListing:
  """Image files of `root/<class>/**`, each once, labelled by class folder.

  Classes are the visible sub-directories of `root`, sorted by name
  (torchvision's ImageFolder order); files are listed in the order
  `sorted(os.walk(...))` gives. Hidden files and directories are not part of
  the data set; a file reached twice through links is listed once (under its
  own name, not the link's); visible files without an image extension
  (`IMG_EXTENSIONS`, any case) and files directly in `root` are returned in
  `skipped`.

  Raises:
    DataError: no class folders, no images, or a class folder without images
      (dropping it would shift every later label).
  """
  from var_jax.io import as_path, is_local
  root_p = as_path(root)
  local = is_local(root_p)
  data_root = os.path.realpath(os.fspath(root_p)) if local else None
  skipped: list[str] = []
  classes = []
  for e in sorted(root_p.iterdir(), key=lambda p: p.name):
    if e.name.startswith("."):
      continue
    if e.is_dir():
      classes.append(e.name)
    else:
      skipped.append(e.name)
  if not classes:
    raise DataError(f"no class folders in {root}")
  paths, labels, empty, owner = [], [], [], {}
  shared = 0
  for label, name in enumerate(classes):
    walk = _walk_local if local else _walk_remote
    dirs = walk(os.fspath(root_p / name) if local else root_p / name, name,
                data_root, skipped)
    found = _once(dirs, local)
    if not found:
      empty.append(name)
    for path, key in found:
      if owner.setdefault(key, label) != label:
        shared += 1
      paths.append(path)
      labels.append(label)
  if not paths:
    raise DataError(f"no images in {root} (extensions "
                    f"{' '.join(IMG_EXTENSIONS)}, any case)")
  if empty:
    raise DataError(f"class folder(s) without images in {root}: "
                    f"{', '.join(repr(n) for n in empty)}")
  return FolderListing(tuple(classes), tuple(paths),
                       np.asarray(labels, np.int32), tuple(sorted(skipped)),
                       shared)


def describe_skipped(root, listing: FolderListing) -> str | None:
  """One warning line about files the listing leaves out, or None."""
  parts = []
  n = len(listing.skipped)
  if n:
    names = ", ".join(listing.skipped[:_NAMED_SKIPS])
    more = f" and {n - _NAMED_SKIPS} more" if n > _NAMED_SKIPS else ""
    parts.append(f"skipped {n} file(s) in {root} that are not images in a "
                 f"class folder (image extensions: "
                 f"{' '.join(IMG_EXTENSIONS)}): {names}{more}")
  if listing.shared:
    parts.append(f"{listing.shared} image(s) are in more than one class "
                 "folder and are used once per folder")
  return "; ".join(parts) if parts else None


class FolderSource:
  """`root/<class>/**/*.{jpg,...}` with classes sorted by name (torchvision).

  See `list_folder` for what is listed; images are read by
  `decode.decode_image` (EXIF orientation, deep images scaled, alpha over
  white).
  """

  def __init__(self, path, split: str, aug: AugConfig):
    root = split_root(path, split)
    listing = list_folder(root)
    warning = describe_skipped(root, listing)
    if warning:
      log.warning("%s", warning)
    self.listing = listing
    self.classes = list(listing.classes)
    self.paths = list(listing.paths)
    self.labels = listing.labels
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


# Folder names a split is found under, in order of preference: ImageNet's
# own archives unpack to `val`, TFDS and many tools call it `validation`.
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"),
                 "validation": ("validation", "val")}


class SplitMissingError(DataError):
  """A data folder laid out in splits that lacks the requested one."""


def split_folders(split: str) -> tuple[str, ...]:
  """Folder names that hold `split` (`val` and `validation` are one split)."""
  return SPLIT_FOLDERS.get(split, (split,))


def split_root(path, split: str):
  """PATH/<split> in the official layout, else PATH itself (an epath).

  `val` and `validation` name the same split: whichever folder exists is
  used. A folder without any split folder is one split by itself (class
  folders directly under PATH).

  Raises:
    DataError: PATH is not a directory.
    SplitMissingError: PATH has split folders, but none for `split`; names
      the folders tried and the split folders present.
  """
  from var_jax.io import as_path
  p = as_path(path)
  if not p.is_dir():
    raise DataError(f"data directory not found: {path}")
  names = split_folders(split)
  for name in names:
    if (p / name).is_dir():
      return p / name
  known = dict.fromkeys(n for v in SPLIT_FOLDERS.values() for n in v)
  present = [n for n in known if (p / n).is_dir()]
  if present:
    tried = " or ".join(str(p / n) for n in names)
    raise SplitMissingError(
        f"split directory missing: no {tried} for split {split!r} ({p} has "
        f"{', '.join(n + '/' for n in present)})")
  return p


def import_sklearn(module: str, what: str):
  """`sklearn.<module>`, imported on first use (scikit-learn is an extra).

  Raises:
    DataError: scikit-learn is not installed; names the package and extra.
  """
  try:
    return importlib.import_module(f"sklearn.{module}")
  except ImportError:
    raise DataError(f"{what} needs scikit-learn: pip install scikit-learn "
                    "(from a checkout: pip install '.[digits]')") from None


class DigitsSource:
  """scikit-learn's bundled 8x8 digits; every 10th image is the 'val' split.

  Raises:
    DataError: an unknown split, or scikit-learn is not installed.
  """

  def __init__(self, split: str, aug: AugConfig):
    if split not in ("train", "val", "validation"):
      raise DataError(f"digits has splits 'train' and 'val' (also called "
                      f"'validation'), not {split!r}")
    # Lazy: scikit-learn is optional and slow to import.
    datasets = import_sklearn("datasets", "the digits data source")
    data = datasets.load_digits()
    held_out = np.arange(len(data.target)) % 10 == 0
    keep = held_out if split != "train" else ~held_out
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
    from var_jax.io import as_path
    if data_dir is not None:
      if not as_path(data_dir).is_dir():  # gs:// data dirs are common here.
        raise DataError(f"data directory not found: {data_dir}")
      data_dir = os.fspath(as_path(data_dir))
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

  The file holds `tokens` int32 (N, L), `labels` int32 (N,) in
  [0, num_classes), `patch_nums`, `num_classes` and (caches written since
  they were added) `vocab_size`, with every token in [0, vocab_size), and
  `tokenizer`, the fingerprint of the tokenizer's weights. Splits
  are whatever was tokenized, so `split` is ignored; augmentation was fixed
  when the cache was written.

  Raises:
    DataError: missing file, not a token cache, or arrays that do not fit
      each other (shapes, label or token range), named.
  """

  def __init__(self, path):
    from var_jax.io import as_path, is_local
    p = as_path(path)
    if not p.is_file():
      raise DataError(f"token cache {path} not found (write one with "
                      "`var-jax tokenize`)")
    try:
      src = os.fspath(p) if is_local(p) else io.BytesIO(p.read_bytes())
      with np.load(src, allow_pickle=False) as z:
        self.tokens_NL = np.asarray(z["tokens"])
        self.labels = np.asarray(z["labels"])
        self.patch_nums = tuple(int(v) for v in z["patch_nums"])
        self.num_classes = int(z["num_classes"])
        self.vocab_size = int(z["vocab_size"]) if "vocab_size" in z else None
        # Fingerprint of the tokenizer that wrote it (None: older caches).
        self.tokenizer = str(z["tokenizer"]) if "tokenizer" in z else None
    except (OSError, ValueError, KeyError, TypeError, EOFError,
            zipfile.BadZipFile) as e:
      raise DataError(f"{path} is not a token cache: {_first_line(e)}"
                      ) from None
    L = sum(p * p for p in self.patch_nums)
    if (self.tokens_NL.ndim != 2 or self.labels.ndim != 1
        or len(self.labels) != len(self.tokens_NL)
        or self.tokens_NL.shape[1] != L):
      raise DataError(f"{path}: tokens {self.tokens_NL.shape} and labels "
                      f"{self.labels.shape} do not fit scales "
                      f"{self.patch_nums} ({L} tokens each)")
    for name, arr in (("tokens", self.tokens_NL), ("labels", self.labels)):
      if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: {name} must be integers, got {arr.dtype}")
    if len(self.labels) and (self.labels.min() < 0
                             or self.labels.max() >= self.num_classes):
      raise DataError(f"{path}: labels span [{self.labels.min()}, "
                      f"{self.labels.max()}], outside [0, {self.num_classes})")
    top = self.vocab_size if self.vocab_size is not None else 2**31
    if self.tokens_NL.size and (self.tokens_NL.min() < 0
                                or self.tokens_NL.max() >= top):
      raise DataError(f"{path}: token ids span [{self.tokens_NL.min()}, "
                      f"{self.tokens_NL.max()}], outside [0, {top})")
    self.tokens_NL = self.tokens_NL.astype(np.int32)
    self.labels = self.labels.astype(np.int32)
    self.path = os.fspath(path)

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
    return TokenSource(rest)
  if scheme == "digits" and not rest:
    return DigitsSource(split, aug)
  if scheme == "folder" and sep and rest:
    return FolderSource(rest, split, aug)
  if scheme == "tfds" and sep and rest:
    return TfdsSource(rest, split, aug, data_dir=data_dir,
                      manual_dir=manual_dir)
  raise DataError(
      f"unknown data spec {spec!r}: expected folder:PATH, tfds:NAME, "
      "tokens:PATH.npz or digits")
