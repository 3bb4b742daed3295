"""Infinity's bitwise tokenizer against the official one (the golden set's
tiny random BSQ VAE: base width 32, 16 bits per token, 256px images)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import infinity_models
from conftest import assert_close_rel

from var_jax.convert.infinity import bsq as bsq_convert
from var_jax.errors import ConvertError
from var_jax.models.infinity import bsq, schedules

GRIDS = schedules.schedule(1.0, 256)


def _nhwc(x):
  return np.moveaxis(x, 1, -1)


@pytest.fixture(scope="module")
def g(golden_dir):
  return infinity_models.arrays(golden_dir)


@pytest.fixture(scope="module")
def sd(golden_dir):
  return infinity_models.tokenizer_sd(golden_dir)


@pytest.fixture(scope="module")
def vae(golden_dir):
  return infinity_models.tokenizer(golden_dir)


@pytest.fixture(scope="module")
def encoding(vae, g):
  return jax.jit(lambda x: vae.encode(x, GRIDS))(_nhwc(g["vae/input_image"]))


def test_config_is_read_off_the_tensors(vae):
  assert vae.cfg == bsq.BSQConfig(codebook_dim=16, ch=32,
                                  ch_mult=(1, 1, 2, 2, 2))


def test_encoding_matches_official(encoding, g):
  cat = lambda xs: np.concatenate([np.asarray(bsq.flatten(x)) for x in xs], 1)
  assert_close_rel(cat(encoding.residuals), g["vae/lfq_in"], name="lfq_in")
  np.testing.assert_array_equal(cat(encoding.codes), g["vae/lfq_out"])
  np.testing.assert_array_equal(cat(encoding.bits), g["vae/bits"])
  assert_close_rel(encoding.summed_BHWC, _nhwc(g["vae/quantized_out"]),
                   name="quantized_out")


def test_features_match_official(encoding, g):
  assert_close_rel(encoding.features, _nhwc(g["vae/raw_features"]),
                   name="raw_features")


def test_codes_from_bits_match_official(g, encoding):
  summed = bsq.summed_codes(encoding.bits, GRIDS, (16, 16))
  assert_close_rel(summed, _nhwc(g["vae/summed_codes_from_bits"][:, :, 0]),
                   name="summed_codes_from_bits")


@pytest.mark.slow  # The decoder at 256px (the sampler test decodes too).
def test_decoding_matches_official(vae, g):
  recon = jax.jit(vae.decode)(_nhwc(g["vae/quantized_out"]))
  assert_close_rel(recon, _nhwc(g["vae/recon"]), name="recon")


def test_teacher_forcing_inputs_match_official(g):
  x, bits = bsq.teacher_forcing_inputs(jnp.asarray(_nhwc(g["vae/raw_features"])),
                                       GRIDS)
  assert_close_rel(x, g["tf/x_BLC_wo_prefix"], name="x_BLC_wo_prefix")
  np.testing.assert_array_equal(bits, g["tf/gt_bits"])


def test_bits_to_codes_is_the_quantizers_code_up_to_an_ulp():
  for d in (14, 16, 32):
    bits = jnp.asarray(np.random.default_rng(d).integers(0, 2, (1, 2, 3, d)))
    codes = bsq.bits_to_codes(bits)
    want = np.where(np.asarray(bits) > 0, 1.0, -1.0) / np.sqrt(d)
    np.testing.assert_allclose(codes, want, rtol=2e-7)


def test_checkpoint_problems_are_one_error(sd):
  cfg = bsq_convert.infer_config(sd)
  bad = dict(sd)
  bad.pop("decoder.conv_out.conv.bias")
  bad["encoder.conv_in.conv.weight"] = np.zeros((32, 3, 1, 1), np.float32)
  with pytest.raises(ConvertError) as e:
    bsq_convert.bsq_params(cfg, bad)
  assert "encoder.conv_in.conv.weight: expected (32,3,3,3), found (32,3,1,1)" \
      in str(e.value) and "missing keys: decoder.conv_out.conv.bias" in str(
          e.value)
  bad = dict(sd)
  bad["quantize.lfq.mask"] = np.arange(16)
  with pytest.raises(ConvertError, match="bit weights.*quantize.lfq.mask"):
    bsq_convert.bsq_params(cfg, bad)


def test_patchify_groups_2x2_positions_in_pixel_unshuffle_order():
  x = np.random.default_rng(0).normal(size=(2, 6, 8, 3)).astype(np.float32)
  p = np.asarray(bsq.patchify(jnp.asarray(x)))
  assert p.shape == (2, 3, 4, 12)
  for c, i, j in [(0, 0, 0), (1, 0, 1), (2, 1, 0), (2, 1, 1)]:
    # Channel 4c + 2i + j of token (y, x) is position (2y + i, 2x + j).
    np.testing.assert_array_equal(p[..., 4 * c + 2 * i + j],
                                  x[:, i::2, j::2, c])
  np.testing.assert_array_equal(np.asarray(bsq.unpatchify(jnp.asarray(p))), x)
