"""Infinity with a patchifying tokenizer (the 8B model's layout) against the
official sampler: tests/reference/infinity_patchify/ (its README lists the
arrays). The transformer sees 4d bits per token on a grid half the
tokenizer's; each token is a 2x2 group of tokenizer cells."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_rel
import infinity_models

from var_jax.convert.infinity import bsq as bsq_convert
from var_jax.convert.weights import read_state_dict, read_weights
from var_jax.models import interp
from var_jax.models.infinity import bsq, schedules
from var_jax.sampling.infinity import sampler as smp

REF = pathlib.Path(__file__).parent / "reference" / "infinity_patchify"
INSERTION = {"logits": 0, "hidden": -1}


@pytest.fixture(scope="module")
def ref():
  with np.load(REF / "reference.npz") as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def pth_files(tmp_path_factory):
  return infinity_models.patchify_pth(REF, tmp_path_factory.mktemp("pth"))


@pytest.fixture(scope="module")
def model(pth_files):
  return infinity_models.transformer_from_sd(read_state_dict(pth_files[0]))


@pytest.fixture(scope="module")
def vae(model, pth_files):
  path = pth_files[1]
  return infinity_models.tokenizer_from_sd(
      bsq_convert.state_dict_of(read_weights(path), path), model.cfg)


def _grids(ref):
  return [tuple(int(v) for v in row[1:]) for row in ref["scale_schedule"]]


def test_the_converted_models_have_the_patchified_layout(model, vae, ref):
  # The tokenizer's 4 bits per cell reach the transformer as 16 per token,
  # and its grids are twice the transformer's.
  assert vae.cfg.spatial_patchify and vae.cfg.codebook_dim == 4
  assert model.cfg.codebook_dim == 16
  grids = _grids(ref)
  assert grids == list(schedules.schedule(1.0, 256))
  assert [(2 * h, 2 * w) for h, w in grids] == [
      tuple(int(v) for v in row[1:]) for row in ref["vae_scale_schedule"]]
  # The learned null text is what the official sampler paired with them.
  mask = ref["text/mask"].astype(bool)
  null = np.asarray(model.null_text(ref["text/mask"]))
  np.testing.assert_array_equal(null[mask], ref["text/null_kv_compact"])


@pytest.mark.parametrize("run", sorted(INSERTION))
def test_drawn_bits_unpatchify_into_the_official_tokenizer_bits(ref, run):
  # Transformer bit 4c + 2 r1 + r2 of token (i, j) is tokenizer bit c of
  # cell (2i + r1, 2j + r2), and patchify undoes it.
  b, start, vstart = 2, 0, 0
  for h, w in _grids(ref):
    bits = ref[f"{run}/bits"][:, start:start + h * w].reshape(b, h, w, 16)
    cells = bsq.unpatchify(jnp.asarray(bits))
    np.testing.assert_array_equal(
        bsq.flatten(cells),
        ref[f"{run}/tokenizer_bits"][:, vstart:vstart + 4 * h * w])
    np.testing.assert_array_equal(bsq.patchify(cells), bits)
    start, vstart = start + h * w, vstart + 4 * h * w


@pytest.mark.slow  # Op by op: 12-22 s a run on 2 cores.
@pytest.mark.parametrize("run", sorted(INSERTION))
def test_each_scale_replays_the_official_run(model, vae, ref, run):
  # Scale by scale on the official trajectory (its bits feed the next
  # scale): the guided logits, the bits wherever the official margin
  # exceeds float32 noise, the next scale's input, the summed codes, the
  # image.
  r = lambda k: ref[f"{run}/{k}"]
  text, mask = ref["text/padded"], ref["text/mask"]
  b, d = text.shape[0], vae.cfg.codebook_dim
  grids = _grids(ref)
  cond = model.condition(jnp.concatenate([text, model.null_text(mask)]),
                         jnp.concatenate([mask, mask]))
  table = schedules.rope_table(1.0, grids, model.cfg.head_dim)
  x, cache, start = model.start_tokens(cond), None, 0
  summed = jnp.zeros((b, 32, 32, d))
  for si, (h, w) in enumerate(grids):
    sl = slice(start, start + h * w)
    out = smp.step(model, cond, x, cache, (table[0, sl], table[1, sl]), si,
                   float(r("cfg_list")[si]), float(r("tau_list")[si]),
                   INSERTION[run], b)
    cache = out.cache
    # Guidance 3 and 1 / tau = 2 multiply float32 noise (and the bfloat16
    # roundings of the cross-attention that land differently) by up to 10.
    assert_close_rel(out.logits_BlV, r("logits")[:, sl], rel=2e-3,
                     name=f"logits scale {si}")
    pairs = np.asarray(out.logits_BlV).reshape(b, h * w, 16, 2)
    ref_pairs = r("logits")[:, sl].reshape(b, h * w, 16, 2)
    sure = np.abs(ref_pairs[..., 1] - ref_pairs[..., 0]) > 1e-2
    drawn = np.argmax(pairs, -1)
    np.testing.assert_array_equal(drawn[sure], r("bits")[:, sl][sure])
    assert (drawn != r("bits")[:, sl]).sum() <= 1, f"scale {si}"
    bits = jnp.asarray(r("bits")[:, sl]).reshape(b, h, w, 16)
    summed = summed + interp.bilinear_resize(
        bsq.bits_to_codes(bsq.unpatchify(bits)), (32, 32))
    if si + 1 < len(grids):
      nh, nw = grids[si + 1]
      nxt = bsq.flatten(bsq.patchify(
          interp.bilinear_resize(summed, (2 * nh, 2 * nw))))
      nsl = slice(sl.stop - 1, sl.stop - 1 + nh * nw)
      assert_close_rel(nxt, r("next_inputs")[:, nsl], name=f"next {si}")
      x = model.embed_scale(jnp.asarray(r("next_inputs")[:, nsl]))
      x = jnp.concatenate([x, x])
    start += h * w
  assert_close_rel(summed, np.moveaxis(r("summed_codes")[:, :, 0], 1, -1),
                   name="summed_codes")


@pytest.mark.slow  # A compiled sampler; the golden greedy run is the
# default suite's end-to-end Infinity test.
def test_the_sampler_draws_the_official_greedy_run(model, vae, ref):
  # The jitted sampler end to end (greedy, guidance on the logits, whose
  # smallest margin, 2.1e-4, is above the replay's logit error): every
  # official bit, the summed codes and the image (kept at every second
  # pixel of prompt 0, in float16).
  opts = smp.InfinityOptions(cfg=tuple(ref["logits/cfg_list"].tolist()),
                             tau=tuple(ref["logits/tau_list"].tolist()),
                             top_k=1, top_p=0.0, cfg_insertion_layer=0)
  out = smp.InfinitySampler(model, vae, opts)(
      ref["text/padded"], ref["text/mask"], seed=0)
  bits = np.concatenate(out.bits, 1)
  np.testing.assert_array_equal(bits, ref["logits/bits"])
  assert_close_rel(out.summed_BHWC,
                   np.moveaxis(ref["logits/summed_codes"][:, :, 0], 1, -1),
                   name="summed_codes")
  img = np.asarray(out.images_BHWC)[:1, ::2, ::2]
  ref_img = np.moveaxis(ref["logits/image"].astype(np.float32), 1, -1)
  assert np.abs(img - (ref_img + 1) / 2).max() <= 1e-3
