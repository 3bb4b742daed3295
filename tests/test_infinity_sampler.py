"""Infinity's sampler against the official runs of the golden set: `samp`
(one prompt, cfg 4 on the logits, tau 0.5, top-k 900, top-p 0.97) and
`greedy` (two prompts, per-scale cfg mixing the hidden states after the
last block, per-scale tau, top-k 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from conftest import assert_close_rel
import infinity_models

from var_jax.errors import UserError
from var_jax.models import interp
from var_jax.models.infinity import bsq, schedules
from var_jax.sampling.infinity import sampler as smp

GRIDS = schedules.schedule(1.0, 256)
RUNS = {"samp": dict(rows=[0], top_k=900, top_p=0.97, insertion=0),
        "greedy": dict(rows=[0, 1], top_k=1, top_p=0.0, insertion=-1)}


@pytest.fixture(scope="module")
def g(golden_dir):
  return infinity_models.arrays(golden_dir)


@pytest.fixture(scope="module")
def model(golden_dir):
  return infinity_models.transformer(golden_dir)


@pytest.fixture(scope="module")
def vae(golden_dir):
  return infinity_models.tokenizer(golden_dir)


@pytest.mark.slow  # Op by op: about half a minute a run on 2 cores.
@pytest.mark.parametrize("run", sorted(RUNS))
def test_each_scale_replays_the_official_run(model, vae, g, run):
  # Scale by scale on the official trajectory (its drawn bits feed the next
  # scale), with the official Exp(1) draws: every block's output, the head
  # and the guidance (from the official last block: guidance multiplies the
  # blocks' float32 noise by |cfg| + |1 - cfg|), the filtering, the draw
  # from our own guided logits, the next input and the image.
  spec, r = RUNS[run], lambda k: g[f"{run}/{k}"]
  hidden, mask = infinity_models.padded_text(g, spec["rows"])
  b, d = hidden.shape[0], model.cfg.codebook_dim
  cond = model.condition(jnp.concatenate([hidden, model.null_text(mask)]),
                         jnp.concatenate([mask, mask]))
  assert_close_rel(cond.cond_BC, r("cond_BD"), name="cond_BD")
  table = schedules.rope_table(1.0, GRIDS, model.cfg.head_dim)
  x, cache, start = model.start_tokens(cond), None, 0
  summed = jnp.zeros((b, 16, 16, d))
  for si, (h, w) in enumerate(GRIDS):
    sl = slice(start, start + h * w)
    cfg, tau = float(r("cfg_list")[si]), float(r("tau_list")[si])
    out = smp.step(model, cond, x, cache, (table[0, sl], table[1, sl]), si,
                   cfg, tau, spec["insertion"], b)
    cache = out.cache
    for i, blk in enumerate(out.blocks):  # Before any guidance mixing.
      assert_close_rel(blk, r("block_out")[i][:, sl],
                       name=f"block {i} scale {si}")
    # The head and the guidance from the official last block's output.
    last = jnp.asarray(r("block_out")[-1][:, sl])
    if spec["insertion"] == 0:
      raw = model.logits(last, cond)
      guided = smp.mix(raw / tau, cfg, b)
    else:
      if cfg != 1.0:
        last = smp.mix(last, cfg, b)
      raw = model.logits(last[:b], smp.Condition(*(a[:b] for a in cond)))
      guided = raw / tau
    assert_close_rel(raw, r("head_logits_raw")[:, sl], name=f"raw {si}")
    assert_close_rel(guided, r("logits_cfg")[:, sl], name=f"guided {si}")
    logits = out.logits_BlV
    masked = smp.filter_bits(logits, spec["top_k"], spec["top_p"])
    ref_masked = r("logits_masked")[:, sl].reshape(masked.shape)
    np.testing.assert_array_equal(np.isinf(masked), np.isinf(ref_masked))
    bits = smp.draw_bits(masked, jnp.asarray(r("exp_noise")[:, sl]))
    np.testing.assert_array_equal(bits, r("bits")[:, sl])
    codes = bsq.bits_to_codes(jnp.asarray(r("bits")[:, sl]).reshape(
        b, h, w, d))
    summed = summed + interp.bilinear_resize(codes, (16, 16))
    if si + 1 < len(GRIDS):
      nxt = bsq.flatten(interp.bilinear_resize(summed, GRIDS[si + 1]))
      nsl = slice(start + h * w - 1, start + h * w - 1 + nxt.shape[1])
      assert_close_rel(nxt, r("next_inputs")[:, nsl], name=f"next {si}")
      x = model.embed_scale(nxt)
      x = jnp.concatenate([x, x])
    start += h * w
  assert_close_rel(summed, np.moveaxis(r("summed_codes")[:, :, 0], 1, -1),
                   name="summed_codes")
  img = (jax.jit(vae.decode)(summed) + 1) / 2
  ref = np.moveaxis(r("image_float"), 1, -1)
  assert np.abs(np.asarray(img) - (ref + 1) / 2).max() <= 1e-3


def test_greedy_run_end_to_end(model, vae, g):
  hidden, mask = infinity_models.padded_text(g, [0, 1])
  opts = smp.InfinityOptions(
      cfg=tuple(g["greedy/cfg_list"].tolist()),
      tau=tuple(g["greedy/tau_list"].tolist()), top_k=1, top_p=0.0,
      cfg_insertion_layer=-1)
  out = smp.InfinitySampler(model, vae, opts)(hidden, mask, seed=3)
  np.testing.assert_array_equal(np.concatenate(out.bits, 1),
                                g["greedy/bits"])
  ref = np.moveaxis(g["greedy/image_float"], 1, -1)
  assert np.abs(np.asarray(out.images_BHWC) - (ref + 1) / 2).max() <= 1e-3


@pytest.mark.slow  # A second compiled sampler.
def test_bfloat16_draws_the_official_greedy_bits(model, vae, g):
  # bfloat16 block matrices and cache (float32 sums): the first scale's
  # logits stay within 1% of float32's, and the greedy run draws the
  # official bits (all of them here; at most one in a thousand may sit on
  # a margin below bfloat16's rounding).
  hidden, mask = infinity_models.padded_text(g, [0, 1])
  opts = smp.InfinityOptions(
      cfg=tuple(g["greedy/cfg_list"].tolist()),
      tau=tuple(g["greedy/tau_list"].tolist()), top_k=1, top_p=0.0,
      cfg_insertion_layer=-1, dtype="bfloat16")
  sampler = smp.InfinitySampler(model, vae, opts)
  bf16_model, _ = nnx.merge(sampler._graph, sampler.state)
  assert bf16_model.block_params()["fc1"].dtype == jnp.bfloat16
  first = []
  for m in (model, bf16_model):
    cond = m.condition(hidden, mask)
    table = schedules.rope_table(1.0, GRIDS, m.cfg.head_dim)
    out = smp.step(m, cond, m.start_tokens(cond), None,
                   (table[0, :1], table[1, :1]), 0, 1.0, 1.0, 0, 2)
    first.append(np.asarray(out.logits_BlV))
  assert out.cache[0].dtype == jnp.bfloat16
  assert_close_rel(first[1], first[0], rel=1e-2, name="bf16 logits")
  bits = np.concatenate(sampler(hidden, mask, seed=3).bits, 1)
  assert (bits == g["greedy/bits"]).mean() >= 0.999


@pytest.mark.slow  # Two compiled samplers.
def test_a_split_batch_draws_the_same_images(model, vae, g):
  # Stochastic draws (the official `samp` settings): each sample's bits
  # come from its own keys, so two prompts drawn together or one at a time
  # (with their indices in the job) give the same images; another seed
  # gives others.
  hidden, mask = infinity_models.padded_text(g, [0, 1])
  sampler = smp.InfinitySampler(model, vae, smp.InfinityOptions(
      cfg=4.0, tau=0.5, top_k=900, top_p=0.97))
  both = sampler(hidden, mask, seed=7)
  for i in range(2):
    one = sampler(hidden[i:i + 1], mask[i:i + 1], seed=7, sample_ids=[i])
    for a, b_ in zip(one.bits, both.bits):
      np.testing.assert_array_equal(a[0], b_[i])
  other = sampler(hidden, mask, seed=8)
  assert any((a != b_).any() for a, b_ in zip(other.bits, both.bits))


@pytest.mark.parametrize("change,needle", [
    (dict(cfg=(1.0, 2.0)), "cfg must be a finite number or 7 of them"),
    (dict(tau=float("nan")), "tau must be a finite number"),
    (dict(tau=0.0), "tau must be > 0"),
    (dict(top_p=1.5), "top_p must be in [0, 1]"),
    (dict(cfg_insertion_layer=-3), "cfg_insertion_layer must be 0"),
    (dict(dtype="float16"), "dtype must be one of float32, bfloat16")])
def test_bad_options_are_named(model, vae, change, needle):
  with pytest.raises(UserError, match=needle.replace("[", r"\[")):
    smp.InfinitySampler(model, vae, smp.InfinityOptions(**change))(
        np.zeros((1, 3, 256), np.float32), np.ones((1, 3), np.int32))


@pytest.mark.parametrize("per_query", [False, True])
def test_query_chunks_attend_like_one_call(monkeypatch, per_query):
  # Large scales attend in chunks of queries; each query's softmax is its
  # own, so the chunks give what one call gives (with a per-query mask too).
  from var_jax.models.infinity import transformer
  rng = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rng.randn(2, n, 2, 8), jnp.float32)
             for n in (10, 13, 13))
  bias = (jnp.where(rng.rand(2, 1, 10, 13) < 0.3, -jnp.inf, 0.0)
          .at[..., 0].set(0.0) if per_query else 0.0)
  whole = transformer.masked_attention(q, k, v, bias, 0.3)
  monkeypatch.setattr(transformer, "QUERY_CHUNK", 4)
  chunked = transformer.masked_attention(q, k, v, bias, 0.3)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
