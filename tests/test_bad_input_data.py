"""Kind 4: training data is what is on disk, each file once, own label.

Folder listing (extensions, hidden files, nested folders, links, skipped
files) and the token cache (`var-jax tokenize`) with undecodable images in a
full batch and in the last partial batch.
"""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from var_jax import cli
from var_jax.data import loader as loader_lib
from var_jax.data.sources import (IMG_EXTENSIONS, AugConfig, DataError,
                                  FolderSource, TokenSource, list_folder)

TORCHVISION_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm",
                          ".tif", ".tiff", ".webp")
# Pillow's writer for each extension.
_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".ppm": "PPM",
            ".bmp": "BMP", ".pgm": "PPM", ".tif": "TIFF", ".tiff": "TIFF",
            ".webp": "WEBP"}


def _img(path, value=0, size=(12, 10)):
  path.parent.mkdir(parents=True, exist_ok=True)
  ext = path.suffix.lower()
  arr = np.full((size[1], size[0], 3), value, np.uint8)
  im = Image.fromarray(arr)
  if ext == ".pgm":
    im = im.convert("L")
  im.save(path, format=_FORMATS[ext])
  return path


def _rel(root, listing):
  return [(os.path.relpath(p, root), int(y))
          for p, y in zip(listing.paths, listing.labels)]


def test_extensions_are_torchvisions_in_any_case(tmp_path):
  assert set(IMG_EXTENSIONS) == set(TORCHVISION_EXTENSIONS)
  names = []
  for i, ext in enumerate(TORCHVISION_EXTENSIONS):
    # Alternate lower and upper case: both are images.
    name = f"f{i}{ext.upper() if i % 2 else ext}"
    _img(tmp_path / "only" / name)
    names.append(name)
  listing = list_folder(tmp_path)
  assert _rel(tmp_path, listing) == [(f"only/{n}", 0) for n in sorted(names)]
  # And every one of them decodes.
  src = FolderSource(str(tmp_path), "train", AugConfig(8, train=False))
  for i in range(len(src)):
    x, y = src.example(i, np.random.default_rng(0))
    assert x.shape == (8, 8, 3) and y == 0


def test_a_class_of_tif_and_pgm_is_a_class(tmp_path):
  _img(tmp_path / "a" / "x.png")
  _img(tmp_path / "b" / "x.tif")
  _img(tmp_path / "b" / "y.pgm")
  listing = list_folder(tmp_path)
  assert listing.classes == ("a", "b")
  assert _rel(tmp_path, listing) == [("a/x.png", 0), ("b/x.tif", 1),
                                     ("b/y.pgm", 1)]


def test_skipped_files_are_one_warning_line_with_a_count(tmp_path, caplog):
  _img(tmp_path / "a" / "x.png")
  (tmp_path / "a" / "notes.txt").write_text("x")
  (tmp_path / "a" / "anim.gif").write_bytes(b"GIF89a")
  (tmp_path / "README.md").write_text("x")           # Outside any class.
  (tmp_path / "a" / ".DS_Store").write_bytes(b"x")   # Hidden: not data.
  with caplog.at_level(logging.WARNING, logger="var_jax.data.sources"):
    FolderSource(str(tmp_path), "train", AugConfig(8, train=False))
  records = [r for r in caplog.records if r.name == "var_jax.data.sources"]
  assert len(records) == 1
  msg = records[0].getMessage()
  assert "\n" not in msg and "skipped 3 file(s)" in msg
  for name in ("a/notes.txt", "a/anim.gif", "README.md"):
    assert name in msg
  assert ".DS_Store" not in msg


def test_listing_is_what_a_user_sees_each_once(tmp_path):
  root = tmp_path / "data"
  _img(root / "ant" / "a1.jpg")
  _img(root / "ant" / "deep" / "er" / "a2.PNG")          # Nested.
  _img(root / "ant" / ".ipynb_checkpoints" / "a1.jpg")   # Hidden dir.
  (root / "ant" / "._a1.jpg").write_bytes(b"\x00\x05")   # macOS metadata.
  _img(root / "bee" / "b1.jpeg")
  _img(root / ".trash" / "x.jpg")                        # Hidden class.
  # A link back up the tree would loop or relist everything under 'ant'.
  os.symlink("..", root / "ant" / "up")
  # A second name for a file in the same class: one image, listed once,
  # under its own name.
  os.symlink("deep/er/a2.PNG", root / "ant" / "a0_alias.png")
  # A class kept elsewhere is followed.
  _img(tmp_path / "elsewhere" / "c1.webp")
  os.symlink(tmp_path / "elsewhere", root / "cat")
  # A link to another class folder is not a second copy under this label.
  os.symlink(root / "bee", root / "ant" / "bees")
  os.symlink("missing.jpg", root / "bee" / "gone.jpg")   # Broken link.
  listing = list_folder(root)
  assert listing.classes == ("ant", "bee", "cat")
  assert _rel(root, listing) == [
      ("ant/a1.jpg", 0), ("ant/deep/er/a2.PNG", 0),
      ("bee/b1.jpeg", 1), ("cat/c1.webp", 2)]
  assert sorted(listing.skipped) == [
      "ant/bees (link back into the data folder)",
      "ant/up (link back into the data folder)",
      "bee/gone.jpg (broken link)"]


def test_split_folder_and_empty_class(tmp_path):
  _img(tmp_path / "train" / "a" / "x.png")
  (tmp_path / "train" / "b").mkdir()
  (tmp_path / "train" / "b" / "x.txt").write_text("x")
  with pytest.raises(DataError, match="class folder.*without images.*'b'"):
    FolderSource(str(tmp_path), "train", AugConfig(8, train=False))
  with pytest.raises(DataError, match="split directory missing"):
    FolderSource(str(tmp_path), "val", AugConfig(8, train=False))


# ------------------------------------------------------------------ tokenize
def _class_images(root, n_per_class, corrupt):
  """root/c{k}/{i}.png: each image a different flat gray per file, so the
  tokens tell files apart; `corrupt` names files replaced by garbage."""
  files = []
  for k in range(2):
    for i in range(n_per_class):
      p = root / f"c{k}" / f"{i:02d}.png"
      if p.relative_to(root).as_posix() in corrupt:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\x89PNG\r\n\x1a\n broken")
      else:
        _img(p, value=20 + 40 * k + 7 * i, size=(70, 64))
        files.append((p, k))
  return files


@pytest.fixture(scope="module")
def digits_tokenizer(random_digits_vae_dir):
  """(resolution, jitted tokenizer) of the random digits VQVAE, made once:
  its one-image program is compiled once for the file, not per test."""
  from var_jax import checkpoint
  from var_jax.models.var.vqvae import jit_tokenizer
  cfg, vae, _ = checkpoint.load_model(random_digits_vae_dir, need_var=False)
  return cfg.vae.resolution, jit_tokenizer(vae)


def _expected_tokens(tokenizer, files):
  """Each file encoded on its own (a batch of one), as decoded and center
  cropped by the data pipeline."""
  from var_jax.data import augment
  res, encode = tokenizer
  rows = []
  for p, _ in files:
    x = augment.augment(augment.decode_image(p), res, train=False,
                        hflip=False, rng=None)
    rows.append(np.concatenate([np.asarray(i) for i in encode(x[None])], 1))
  return np.concatenate(rows)


@pytest.mark.parametrize("corrupt", [
    ("c1/04.png",),               # In the last, partial batch (10 -> 4,4,2).
    # In a full batch, before another class: the class-boundary case below
    # has it too (a gap in a full batch), so the default suite skips it.
    pytest.param(("c0/01.png",), marks=pytest.mark.slow),
    ("c0/04.png", "c1/00.png"),   # At a class boundary, in a full batch.
], ids=["last-partial", "full-batch", "class-boundary"])
def test_token_cache_holds_exactly_the_decodable_images(
    random_digits_vae_dir, digits_tokenizer, tmp_path, capsys, corrupt):
  files = _class_images(tmp_path / "imgs", 5, corrupt)
  out = tmp_path / "tok.npz"
  code = cli.main(["tokenize", "--ckpt", str(random_digits_vae_dir), "--data",
                   f"folder:{tmp_path / 'imgs'}", "--out", str(out),
                   "--batch", "4"])
  _, err = capsys.readouterr()
  assert code == 0, err
  assert "Traceback" not in err
  assert f"skipped {len(corrupt)} undecodable image(s)" in err
  z = np.load(out)
  np.testing.assert_array_equal(z["labels"], [k for _, k in files])
  np.testing.assert_array_equal(z["tokens"],
                                _expected_tokens(digits_tokenizer, files))
  assert int(z["skipped"]) == len(corrupt)
  assert len(TokenSource(str(out))) == len(files)


def test_no_decodable_image_writes_nothing(random_digits_vae_dir, tmp_path,
                                           capsys):
  (tmp_path / "imgs" / "a").mkdir(parents=True)
  (tmp_path / "imgs" / "a" / "x.png").write_bytes(b"nope")
  out = tmp_path / "tok.npz"
  code = cli.main(["tokenize", "--ckpt", str(random_digits_vae_dir), "--data",
                   f"folder:{tmp_path / 'imgs'}", "--out", str(out)])
  _, err = capsys.readouterr()
  assert code == 2 and "no decodable image" in err and "Traceback" not in err
  assert not out.exists()
  assert sorted(os.listdir(tmp_path)) == ["imgs"]


def test_training_loader_skips_with_the_same_counter(tmp_path, caplog):
  files = _class_images(tmp_path, 3, ("c0/01.png",))
  with caplog.at_level(logging.WARNING, logger="var_jax.data.loader"):
    ld = loader_lib.make_loader(f"folder:{tmp_path}", split="val",
                                resolution=8, global_batch=len(files) + 1,
                                seed=0, shuffle=False, num_workers=0,
                                num_epochs=1)
    batch = next(ld)
  ld.close()
  assert isinstance(ld.skips, loader_lib.SkipCounter)
  assert ld.stats() == {"corrupt_skipped": 1, "corrupt_unique": 1}
  # The slot of c0/01 holds the next file, c0/02, with its own label 0.
  np.testing.assert_array_equal(batch["labels"], [0, 0, 0, 1, 1, 1])
  assert "c0/01.png" in caplog.text


# --------------------------------------------------------------- token caches
@pytest.mark.parametrize("change,match", [
    (dict(labels=np.array([0, 5], np.int32)), r"labels span \[0, 5\]"),
    (dict(tokens=np.full((2, 5), 7, np.int32)), r"outside \[0, 4\)"),
    (dict(tokens=np.zeros((2, 4), np.int32)), "do not fit scales"),
    (dict(labels=np.zeros(3, np.int32)), "do not fit scales"),
], ids=["label-range", "token-range", "length", "count"])
def test_token_cache_parts_must_agree(tmp_path, change, match):
  arrays = dict(tokens=np.zeros((2, 5), np.int32),
                labels=np.zeros(2, np.int32), patch_nums=np.array([1, 2]),
                num_classes=np.int32(3), vocab_size=np.int32(4))
  arrays.update(change)
  np.savez(tmp_path / "t.npz", **arrays)
  with pytest.raises(DataError, match=match):
    TokenSource(str(tmp_path / "t.npz"))


@pytest.mark.parametrize("kw,match", [
    (dict(resolution=0), "resolution"), (dict(mid_reso=0.5), "mid_reso"),
    (dict(mid_reso=float("nan")), "mid_reso"),
    (dict(max_shift=-1), "max_shift"),
    (dict(num_workers=-2), "num_workers"), (dict(num_epochs=0), "num_epochs"),
    (dict(log_every=0), "log_every"),
])
def test_loader_numbers_out_of_domain_are_refused(kw, match):
  args = dict(split="train", resolution=8, global_batch=2, seed=0)
  args.update(kw)
  with pytest.raises(DataError, match=match):
    loader_lib.make_loader("digits", **args)
