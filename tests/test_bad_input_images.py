"""Kind 1: every command reads an image file as a viewer shows it.

One reader (`var_jax.data.decode.decode_image`) serves `edit --image`
(`sampling.images.load_image`), folder data (train, train-vae, tokenize) and
eval. Each case writes a real file in the format a camera or an editor would
produce and compares the decoded pixels with what the picture shows.
"""

import io

import numpy as np
import pytest
from PIL import Image

from var_jax.data import augment, decode
from var_jax.data.sources import AugConfig, FolderSource
from var_jax.errors import UserError
from var_jax.sampling.images import load_image

EXIF_ORIENTATION = 0x0112


def _upright_scene(h=48, w=64):
  """A picture with a red band on its left edge and a blue square at the
  bottom right, so that any rotation or mirror moves them."""
  img = np.full((h, w, 3), 128, np.uint8)
  img[:, :w // 8] = (255, 0, 0)
  img[-h // 4:, -w // 4:] = (0, 0, 255)
  return img


def _sideways_jpeg(path, upright):
  """Stores `upright` rotated a quarter turn left, with the EXIF note
  (Orientation=6: rotate 90 degrees clockwise to view) a camera writes."""
  stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
  exif = Image.Exif()
  exif[EXIF_ORIENTATION] = 6
  stored.save(path, "JPEG", exif=exif, quality=95)
  return stored


def test_exif_orientation_6_is_shown_upright(tmp_path):
  up = _upright_scene()
  stored = _sideways_jpeg(tmp_path / "photo.jpg", up)
  assert stored.size == (up.shape[0], up.shape[1])  # Really stored sideways.
  got = np.asarray(decode.decode_image(tmp_path / "photo.jpg"), np.int16)
  assert got.shape == up.shape
  assert np.abs(got - up).mean() < 3  # JPEG noise only.
  # Same through the editing reader: a box over the left 15% of the picture
  # (`edit --box 0,0,0.15,1`) covers the red band, not the top of the file.
  _sideways_jpeg(tmp_path / "square.jpg", _upright_scene(48, 48))
  x = load_image(tmp_path / "square.jpg", 48)
  band = (x[:, :int(0.15 * 48)] + 1) * 127.5
  assert band[..., 0].mean() > 200 and band[..., 2].mean() < 60


def test_16bit_grayscale_gradient_stays_a_gradient(tmp_path):
  ramp_HW = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16),
                    (32, 1))
  Image.fromarray(ramp_HW).save(tmp_path / "ramp16.png")
  assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
  got = np.asarray(decode.decode_image(tmp_path / "ramp16.png"), np.float64)
  want = ramp_HW / 257.0  # 65535 -> 255.
  assert np.abs(got[..., 0] - want).max() <= 0.5
  assert (got[..., 0] == got[..., 2]).all()
  # Not all white: the left half is dark.
  assert got[:, :16].mean() < 70 and got[:, -16:].mean() > 185
  x = load_image(tmp_path / "ramp16.png", 32)  # The middle half, 32 wide.
  cols = x[..., 0].mean(0)
  assert (np.diff(cols) > 0).all() and cols[-1] - cols[0] > 0.9


@pytest.mark.parametrize("fmt", ["pgm", "tif"])
def test_other_16bit_files_scale_too(tmp_path, fmt):
  ramp_HW = np.tile(np.arange(0, 65536, 1024, dtype=np.uint16), (8, 1))
  Image.fromarray(ramp_HW).save(tmp_path / f"r.{fmt}")
  got = np.asarray(decode.decode_image(tmp_path / f"r.{fmt}"))[..., 0]
  assert np.abs(got - ramp_HW / 257.0).max() <= 0.5


def test_32bit_integer_tiff_uses_its_full_range(tmp_path):
  ramp = np.tile(np.linspace(0, 2**31 - 1, 16).astype(np.int32), (4, 1))
  Image.fromarray(ramp, mode="I").save(tmp_path / "r32.tif")
  got = np.asarray(decode.decode_image(tmp_path / "r32.tif"))[..., 0]
  assert np.abs(got - ramp / (2**31 - 1) * 255).max() <= 0.5


def test_float_tiff_is_taken_as_unit_range(tmp_path):
  ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (4, 1))
  Image.fromarray(ramp, mode="F").save(tmp_path / "f.tif")
  got = np.asarray(decode.decode_image(tmp_path / "f.tif"))[..., 0]
  assert np.abs(got - ramp * 255).max() <= 0.5


def test_alpha_is_composited_over_white(tmp_path):
  rgba = np.zeros((4, 6, 4), np.uint8)
  rgba[..., :3] = (10, 200, 30)  # Colour stored under every pixel.
  rgba[:, :2, 3] = 255           # Opaque.
  rgba[:, 2:4, 3] = 128          # Half transparent.
  rgba[:, 4:, 3] = 0             # Fully transparent.
  Image.fromarray(rgba).save(tmp_path / "a.png")
  got = np.asarray(decode.decode_image(tmp_path / "a.png"), np.int16)
  assert decode.BACKGROUND == (255, 255, 255)
  np.testing.assert_array_equal(got[:, :2], np.broadcast_to((10, 200, 30),
                                                            (4, 2, 3)))
  np.testing.assert_array_equal(got[:, 4:], 255)
  half = np.round((np.array([10, 200, 30]) * 128 + 255 * 127) / 255)
  assert np.abs(got[:, 2:4] - half).max() <= 1
  # Gray + alpha the same way.
  la = Image.fromarray(np.stack([rgba[..., 1], rgba[..., 3]], -1), "LA")
  la.save(tmp_path / "la.png")
  got = np.asarray(decode.decode_image(tmp_path / "la.png"))
  assert (got[:, :2] == 200).all() and (got[:, 4:] == 255).all()


def test_palette_transparency_and_cmyk(tmp_path):
  idx = np.array([[0, 1], [2, 1]], np.uint8)
  pal = Image.fromarray(idx, "P")
  pal.putpalette([0, 0, 0, 250, 10, 10, 10, 250, 10] + [0] * 759)
  pal.save(tmp_path / "p.png", transparency=0)  # Palette entry 0 is clear.
  got = np.asarray(decode.decode_image(tmp_path / "p.png"))
  np.testing.assert_array_equal(got[0, 0], (255, 255, 255))
  np.testing.assert_array_equal(got[0, 1], (250, 10, 10))
  np.testing.assert_array_equal(got[1, 0], (10, 250, 10))
  up = _upright_scene()
  Image.fromarray(up).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
  got = np.asarray(decode.decode_image(tmp_path / "c.jpg"), np.int16)
  assert np.abs(got - up).mean() < 3


def test_one_reader_everywhere(tmp_path):
  # augment.decode_image (eval's entry point) is the same function, and a
  # folder data set reads through it: the sideways photo arrives upright.
  assert augment.decode_image is decode.decode_image
  up = _upright_scene(64, 64)
  (tmp_path / "cls").mkdir()
  _sideways_jpeg(tmp_path / "cls" / "p.jpg", up)
  src = FolderSource(str(tmp_path), "train",
                     AugConfig(resolution=64, train=False, mid_reso=1.0))
  x, label = src.example(0, np.random.default_rng(0))
  assert label == 0
  got = (x + 1) * 127.5
  assert np.abs(got - up).mean() < 4


def test_unreadable_inputs_are_one_error(tmp_path):
  (tmp_path / "t.jpg").write_bytes(b"\xff\xd8 truncated")
  with pytest.raises(decode.CorruptImageError):
    decode.decode_image(tmp_path / "t.jpg")
  with pytest.raises(decode.CorruptImageError):
    decode.decode_image(tmp_path / "missing.png")
  with pytest.raises(UserError, match="no such image file"):
    load_image(tmp_path / "missing.png", 16)
  with pytest.raises(UserError, match="not a readable image"):
    load_image(tmp_path / "t.jpg", 16)
  buf = io.BytesIO()
  Image.fromarray(_upright_scene()).save(buf, "PNG")
  full = buf.getvalue()
  with pytest.raises(decode.CorruptImageError):
    decode.decode_image(full[:len(full) // 2])


def test_arrays_keep_their_range():
  ramp16 = np.tile(np.arange(0, 65536, 4096, dtype=np.uint16), (2, 1))
  got = np.asarray(decode.decode_image(ramp16))[..., 0]
  assert np.abs(got - ramp16 / 257.0).max() <= 0.5
  with pytest.raises(decode.CorruptImageError, match="uint8 or uint16"):
    decode.decode_image(np.zeros((4, 4, 3), np.float32))
