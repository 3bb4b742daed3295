"""Image sets for `var-jax eval`: ADM `.npz` batches and image folders.

Both are checked completely when opened (format, dtype, shape, one image
size) and then read a batch at a time: an ADM npz is streamed from its zip
member, so a 50k x 256 x 256 x 3 file (9.8 GB) never sits in memory.

`fingerprint()` identifies the content a feature cache was made from: for an
npz, the SHA-256 of its images' bytes (computed while the images are
streamed for the network, or by one streaming pass when a cache is checked);
for a folder, the name, size and modification time of every image file.
"""

from __future__ import annotations

import concurrent.futures
import os
import zipfile

import numpy as np

from var_jax.errors import DataError
from var_jax.io import as_path, is_local

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ADM_KEY = "arr_0"


def _npy_header(fh, where: str):
  """(shape, fortran_order, dtype, header bytes) of an open .npy stream."""
  try:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version in ((2, 0), (3, 0)):
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
      raise ValueError(f"unknown .npy version {version}")
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f"{where}: unreadable .npy header ({e})") from None
  return tuple(shape), fortran, dtype, fh.tell()


def open_npz(path) -> zipfile.ZipFile:
  """Opens an .npz (local or `gs://`) as a zip archive; a truncated file
  fails here (its central directory, at the end, is gone)."""
  path = as_path(path)
  try:
    if is_local(path):
      return zipfile.ZipFile(os.fspath(path))
    return zipfile.ZipFile(path.open("rb"))
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise DataError(f"{path}: not a readable .npz (truncated or corrupt? "
                    f"{type(e).__name__}: {e})") from None


def npz_keys(zf: zipfile.ZipFile) -> list[str]:
  return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


class NpzImages:
  """`arr_0` of an ADM batch: uint8 (N, H, W, 3), streamed in batches."""

  def __init__(self, path):
    self.path = as_path(path)
    where = f"{self.path}"
    with open_npz(self.path) as zf:
      keys = npz_keys(zf)
      if ADM_KEY not in keys:
        raise DataError(
            f"{where} has no {ADM_KEY} (arrays: {', '.join(keys) or 'none'}); "
            "an ADM batch holds its images as arr_0, uint8 (N, H, W, 3)")
      info = zf.getinfo(f"{ADM_KEY}.npy")
      with zf.open(info) as fh:
        shape, fortran, dtype, header = _npy_header(fh, f"{where}:{ADM_KEY}")
    if dtype != np.uint8:
      raise DataError(
          f"{where}: {ADM_KEY} is {dtype}, expected uint8 images in 0..255 "
          "(the ADM format; convert floats in [0, 1] with "
          "np.clip(np.round(x * 255), 0, 255).astype(np.uint8))")
    if len(shape) != 4 or shape[-1] != 3 or 0 in shape:
      raise DataError(f"{where}: {ADM_KEY} has shape {shape}, expected "
                      "(N, H, W, 3) with N, H, W > 0")
    if fortran:
      raise DataError(f"{where}: {ADM_KEY} is stored in Fortran order; save "
                      "it with np.savez(path, arr_0=np.ascontiguousarray(x))")
    self.n = int(shape[0])
    self.image_shape = tuple(int(s) for s in shape[1:])
    self._image_bytes = int(np.prod(self.image_shape))
    if info.file_size < header + self.n * self._image_bytes:
      raise DataError(f"{where}: {ADM_KEY} declares {shape} but holds "
                      f"{info.file_size - header} bytes of data (truncated)")
    self._digest: str | None = None

  def fingerprint(self) -> str:
    """SHA-256 (short hex) of the images' bytes; one streaming pass unless
    a complete read by `batches` already computed it."""
    if self._digest is None:
      for _ in self.batches(0, self.n, max(1, (16 << 20) // self._image_bytes)):
        pass
    return self._digest

  def describe(self) -> str:
    return f"{self.path} ({self.n} images {self.image_shape[0]}x"\
           f"{self.image_shape[1]})"

  def batches(self, start: int, stop: int, batch: int):
    """Yields uint8 (b, H, W, 3) arrays of images [start, stop), b <= batch.

    Raises:
      DataError: the file changed or is corrupt (short read, bad CRC).
    """
    from var_jax.fingerprints import StreamHash
    # A read of every image hashes them on the way (the cache fingerprint).
    digest = StreamHash() if (start, stop) == (0, self.n) else None
    try:
      with open_npz(self.path) as zf, zf.open(f"{ADM_KEY}.npy") as fh:
        _, _, _, header = _npy_header(fh, str(self.path))
        if start:
          fh.seek(header + start * self._image_bytes)
        for i in range(start, stop, batch):
          b = min(batch, stop - i)
          data = fh.read(b * self._image_bytes)
          if len(data) != b * self._image_bytes:
            raise DataError(f"{self.path}: {ADM_KEY} ends after "
                            f"{i + len(data) // self._image_bytes} of "
                            f"{self.n} images (truncated)")
          if digest is not None:
            digest.update(data)
          yield np.frombuffer(data, np.uint8).reshape((b,) + self.image_shape)
        if digest is not None:
          self._digest = digest.hexdigest()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise DataError(f"{self.path}: read failed ({type(e).__name__}: {e})"
                      ) from None


def _walk(folder):
  """Image files under `folder` (any depth; hidden names skipped)."""
  for p in folder.iterdir():
    if p.name.startswith("."):
      continue
    if p.is_dir():
      yield from _walk(p)
    elif p.suffix.lower() in IMAGE_SUFFIXES:
      yield p


def _oriented_size(path) -> tuple[int, int]:
  """(H, W) from the header, after the EXIF rotation a decoder applies."""
  from PIL import Image
  with path.open("rb") as fh, Image.open(fh) as img:
    w, h = img.size
    try:
      orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001  (a broken EXIF block is not our concern)
      orientation = 1
  return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


class FolderImages:
  """PNG/JPEG files under a folder (recursively, sorted by path), one size.

  Each image is decoded by the project's one reader,
  `var_jax.data.augment.decode_image` (RGB).
  """

  def __init__(self, path, workers: int | None = None):
    self.path = as_path(path)
    files = sorted(_walk(self.path), key=os.fspath)
    if not files:
      raise DataError(f"{self.path}: no .png/.jpg/.jpeg images in this folder")
    self.files = files
    self.n = len(files)
    self.workers = workers or min(8, os.cpu_count() or 1)
    sizes = {}
    with concurrent.futures.ThreadPoolExecutor(self.workers) as ex:
      for f, size in zip(files, ex.map(self._peek, files)):
        sizes.setdefault(size, f)
        if len(sizes) > 1:
          (s0, f0), (s1, f1) = list(sizes.items())[:2]
          raise DataError(
              f"{self.path}: images of different sizes ({f0.name} is "
              f"{s0[0]}x{s0[1]}, {f1.name} is {s1[0]}x{s1[1]}); resize them "
              "to one size first")
    (h, w), = sizes
    self.image_shape = (h, w, 3)

  @staticmethod
  def _peek(path):
    try:
      return _oriented_size(path)
    except Exception as e:  # noqa: BLE001  (PIL raises many types)
      raise DataError(f"{path}: not a readable image ({type(e).__name__}: "
                      f"{e})") from None

  def fingerprint(self) -> str:
    """Name, size and modification time of every image file (no byte read)."""
    from var_jax.fingerprints import files_fingerprint
    return files_fingerprint(self.files, root=self.path)

  def describe(self) -> str:
    return f"{self.path}/ ({self.n} images {self.image_shape[0]}x"\
           f"{self.image_shape[1]})"

  def _decode(self, path) -> np.ndarray:
    from var_jax.data.augment import CorruptImageError, decode_image
    try:
      img = decode_image(path)
    except CorruptImageError as e:
      raise DataError(f"{path}: cannot decode ({e})") from None
    arr = np.asarray(img, np.uint8)
    if arr.shape != self.image_shape:
      raise DataError(f"{path}: decodes to {arr.shape}, the other images are "
                      f"{self.image_shape}")
    return arr

  def batches(self, start: int, stop: int, batch: int):
    with concurrent.futures.ThreadPoolExecutor(self.workers) as ex:
      for i in range(start, stop, batch):
        files = self.files[i:min(i + batch, stop)]
        yield np.stack(list(ex.map(self._decode, files)))


def open_images(path):
  """An ADM `.npz` or a folder of PNG/JPEG files, checked.

  Raises:
    DataError: missing path, unknown kind, or any check above failing.
  """
  p = as_path(path)
  if p.is_dir():
    return FolderImages(p)
  if not p.exists():
    raise DataError(f"{p}: no such file or folder")
  if p.suffix.lower() == ".npz":
    return NpzImages(p)
  raise DataError(f"{p}: expected an ADM .npz (arr_0 uint8 (N, H, W, 3)) or a "
                  "folder of PNG/JPEG images")
