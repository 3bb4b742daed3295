"""The scale loop of next-scale sampling, in two forms.

Each scale decodes its tokens against the KV cache, mixes the guided logits
`(1 + t) cond - t uncond` with `t = cfg * si / (K - 1)`, filters them
(top-k, top-p), divides by the temperature, draws one token per position and
folds the chosen codes into f_hat through Phi and bicubic upsampling; the
next scale's input is f_hat area-resized to its size. This is the scale loop
of the official `VAR.autoregressive_infer_cfg` (FoundationVision VAR
`models/var.py`).

Rows: while guidance is on, every sample has two rows, its conditional row
followed by its null-class row (2B rows). From scale `cfg_until` on, the
null rows (and their keys/values) are dropped and the scale runs B rows.

Two equivalent forms:
  * `run_unrolled`: a Python loop at trace time over a run of consecutive
    scales; every scale has static shapes and keeps its keys/values as one
    cache chunk (`VAR.decode_chunks`). A run may start at a scale > 0 from
    another model's inputs (collaborative decoding): one block-causal pass
    (`VAR.prefill_chunks`) then fills the cache and gives that scale's
    logits.
  * `run_scan`: one `lax.scan` step per scale with fixed shapes. Every scale
    is padded to the largest scale's token count `lmax`, written at its
    dynamic start; keys at or past the scale's end are masked. Because every
    start is at most the last scale's start, start + lmax <= L: the padded
    writes never leave the cache, and the junk they leave past `end` is
    overwritten by the next scale before anyone can attend to it.

Randomness is a pure function of (seed, scale, global sample index, token
position): each token has its own key, so the same seed gives the same
tokens for any batch split, either form, and whichever model draws a scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax
import numpy as np

from var_jax.models.var import quantizer
from var_jax.models.scales import layout
from var_jax.models.var.transformer import KVCache
from var_jax.models.var.vqvae import one_image_at_a_time
from var_jax.sampling import filtering


@flax.struct.dataclass
class SampleState:
  """What the scale loop carries besides the next input."""

  f_hat_BHWC: jax.Array  # float32 (B, pn_K, pn_K, Cvae), accumulated latent.
  # Keys/values of every layer: preallocated (depth, rows, H, L, c) for all
  # L positions (scan form), or a tuple of one chunk per finished scale
  # (unrolled form).
  cache: KVCache | tuple
  key: jax.Array  # Base key of the token draws (folded, never advanced).
  tokens_BL: jax.Array  # int32 (B, L) ids of all scales, concatenated.
  logits_BLV: jax.Array | None  # float32 guided logits if collected.


def init_state(opts, patch_nums, cvae, vocab, key, batch, cache=()):
  """The empty state for `batch` samples."""
  lay = layout(patch_nums)
  hw = patch_nums[-1]
  logits = (jnp.zeros((batch, lay.seq_len, vocab), jnp.float32)
            if opts.collect_logits else None)
  return SampleState(
      f_hat_BHWC=jnp.zeros((batch, hw, hw, cvae), jnp.float32), cache=cache,
      key=key, tokens_BL=jnp.zeros((batch, lay.seq_len), jnp.int32),
      logits_BLV=logits)


def scale_table(patch_nums, cfg: float, temperature) -> dict:
  """Per-scale numbers that enter the program as data (no recompilation).

  Returns {"mix": float32 (K, 4) rows (1 + t, t, 1 + ratio, Gumbel tau),
  "temperature": float32 (K,)}, computed in float64 and rounded once, as the
  reference's Python floats are.
  """
  k = len(patch_nums)
  rows = []
  for si in range(k):
    r = si / (k - 1) if k > 1 else 0.0
    t = cfg * r
    rows.append((1 + t, t, 1 + r, filtering.gumbel_temperature(r)))
  return {"mix": np.asarray(rows, np.float32),
          "temperature": np.asarray(temperature, np.float32)}


def token_keys(key, si, ids_B, pos_l):
  """(B, l) keys: key folded with the scale, the sample index, the position."""
  k_si = jax.random.fold_in(key, si)
  per_b = jax.vmap(lambda i: jax.random.fold_in(k_si, i))(ids_B)
  return jax.vmap(lambda kb: jax.vmap(
      lambda p: jax.random.fold_in(kb, p))(pos_l))(per_b)


def cond_rows(var, labels_B, paired: bool):
  """(rows, C) class vectors: (label, null) per sample if paired, else label."""
  if not paired:
    return var.class_emb(labels_B)
  null = jnp.full_like(labels_B, var.cfg.num_classes)
  return var.class_emb(jnp.stack([labels_B, null], axis=1).reshape(-1))


def _pair_rows(x_BlC):
  """Duplicates each sample's input for its conditional and null rows."""
  return jnp.repeat(x_BlC, 2, axis=0)


def _cond_only(a, axis=0):
  """Keeps the conditional rows (even indices) of a paired array."""
  return jax.lax.slice_in_dim(a, 0, a.shape[axis], 2, axis=axis)


def draw(quant, opts, logits_RlV, mix, temperature, keys_Bl, top_k, top_p,
         paired: bool):
  """Guided mix, filtering and the draw of one scale.

  Args:
    quant: the VQVAE quantizer (codebook).
    opts: the static `SampleOptions` (more_smooth).
    logits_RlV: float32 logits of the rows, (2B, l, V) paired or (B, l, V).
    mix: one row of `scale_table(...)["mix"]`; temperature: its scalar.
    keys_Bl: one key per token.
    top_k, top_p: this scale's filter settings (see `filtering.keep_mask`).
    paired: whether the rows hold (cond, null) pairs.

  Returns:
    ids (B, l) int32, code vectors (B, l, Cvae) float32, and the guided
    logits (B, l, V) the keep set was computed on.
  """
  if paired:
    r, l, v = logits_RlV.shape
    pair = logits_RlV.reshape(r // 2, 2, l, v)
    guided = mix[0] * pair[:, 0] - mix[1] * pair[:, 1]
  else:
    guided = logits_RlV
  filtered = filtering.filter_logits(guided, top_k, top_p)
  idx_Bl = filtering.categorical(keys_Bl, filtered, temperature)
  if opts.more_smooth:
    # Smoothing uses the untempered filtered logits, as CoDe's reference.
    g_keys = jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, 1)))(keys_Bl)
    h_BlC = filtering.gumbel_soft_embed(g_keys, filtered, quant.codebook_VC,
                                        mix[2], mix[3])
  else:
    h_BlC = jnp.take(quant.codebook_VC, idx_Bl, axis=0)
  return idx_Bl, h_BlC, guided


def apply_edit(quant, h_BlC, given_Bl, keep_Bl):
  """Keeps the given codes where `keep` (the notebook's replace_embedding).

  Only the code vectors are replaced; the recorded ids stay the drawn ones,
  as in the notebook (where(keep, given, drawn) gives the edited image's ids).
  """
  if given_Bl is None:
    return h_BlC
  gt_h = jnp.take(quant.codebook_VC, given_Bl, axis=0)
  return jnp.where(keep_Bl[..., None], gt_h, h_BlC)


def _store(state, start, idx_Bl, guided_BlV):
  tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens_BL, idx_Bl, start,
                                               axis=1)
  logits = state.logits_BLV
  if logits is not None:
    logits = jax.lax.dynamic_update_slice_in_dim(logits, guided_BlV, start,
                                                 axis=1)
  return tokens, logits


def run_unrolled(var, layers, quant, opts, table, labels_B, state, scales,
                 ids_B, edit, hub_BLC=None):
  """Runs consecutive `scales` with one transformer (unrolled form).

  Args:
    var: the VAR; layers: its per-layer parameters or None (scan over the
      stack), see `VAR.decode`.
    quant: the VQVAE quantizer.
    opts: static options with per-scale tuples `top_k`, `top_p` and an int
      `cfg_until` (see `SampleOptions.resolved`).
    table: `scale_table(...)`, as data.
    labels_B: int32 class ids.
    state: `SampleState` with an empty cache (a tuple).
    scales: the run, e.g. range(0, N) or range(N, K).
    ids_B: global sample indices (for the keys).
    edit: None or (given_BL int32, keep_BL bool).
    hub_BLC: for a run starting at scale s0 > 0, the raw (Cvae) inputs of
      scales 1..s0 concatenated, (B, ends[s0] - first_l, Cvae), from the
      model that drew scales < s0 (CoDe's `token_hub`).

  Returns:
    The state and the raw (Cvae) inputs this run built for the scales after
    each of its scales, concatenated along positions (B, l, Cvae); for a
    run over scales 0..N-1 these are the inputs of scales 1..N, what a
    refiner starting at N takes as `hub_BLC`. None if the run built none.
  """
  patch_nums = var.cfg.patch_nums
  lay = layout(patch_nums)
  dtype = jnp.dtype(opts.dtype)
  s0 = scales[0]
  paired = s0 < opts.cfg_until
  cond = cond_rows(var, labels_B, paired)
  ada = var.adaln_all(cond, layers)
  lvl_pos = var.lvl_pos()
  maps, nxt = [], None
  for si in scales:
    start, end = lay.begin_ends[si]
    cache = state.cache
    if paired and si >= opts.cfg_until:  # Guidance ends: drop the null rows.
      paired = False
      cond, ada = _cond_only(cond), _cond_only(ada, axis=1)
      cache = tuple(KVCache(_cond_only(c.k, 1), _cond_only(c.v, 1))
                    for c in cache)
    rows = _pair_rows if paired else (lambda a: a)
    if si == s0 and si > 0:
      first = lay.first_l
      x = jnp.concatenate([
          var.sos(cond),
          rows(var.word_embed(hub_BLC) + lvl_pos[:, first:end])], axis=1)
      h, chunk = var.prefill_chunks(x, cond, patch_nums[:si + 1], dtype,
                                    ada=ada, layers=layers)
      h, cache = h[:, start:], (chunk,)
    else:
      x = (var.sos(cond) if si == 0 else
           rows(var.word_embed(nxt) + lvl_pos[:, start:end]))
      h, chunk = var.decode_chunks(x, cond, cache, dtype, ada=ada,
                                   layers=layers)
      cache = cache + (chunk,)
    logits = var.logits(h, cond)
    keys = token_keys(state.key, si, ids_B, jnp.arange(start, end))
    idx, code, guided = draw(quant, opts, logits, table["mix"][si],
                             table["temperature"][si], keys, opts.top_k[si],
                             opts.top_p[si], paired)
    if edit is not None:
      code = apply_edit(quant, code, edit[0][:, start:end],
                        edit[1][:, start:end])
    tokens, logits_all = _store(state, start, idx, guided)
    pn = patch_nums[si]
    f_hat, nxt = quantizer.next_ar_input(
        quant, si, state.f_hat_BHWC, code.reshape(-1, pn, pn, code.shape[-1]),
        patch_nums)
    state = state.replace(f_hat_BHWC=f_hat, cache=cache, tokens_BL=tokens,
                          logits_BLV=logits_all)
    if si + 1 < lay.num_scales:
      nxt = nxt.reshape(nxt.shape[0], -1, nxt.shape[-1])
      maps.append(nxt)
  return state, (jnp.concatenate(maps, axis=1) if maps else None)


def _scale_branches(quant, patch_nums):
  """One `lax.switch` branch per scale: add its codes, build the next map."""
  lay = layout(patch_nums)
  b_pad = lay.lmax

  def make(si):
    pn = patch_nums[si]

    def branch(f_hat, code_BlC):
      b, _, c = code_BlC.shape
      h = code_BlC[:, :pn * pn].reshape(b, pn, pn, c)
      f_hat, nxt = quantizer.next_ar_input(quant, si, f_hat, h, patch_nums)
      if si + 1 == lay.num_scales:
        return f_hat, jnp.zeros((b, b_pad, c), f_hat.dtype)
      nxt = nxt.reshape(b, -1, c)
      return f_hat, jnp.pad(nxt, ((0, 0), (0, b_pad - nxt.shape[1]), (0, 0)))

    return branch

  return [make(si) for si in range(lay.num_scales)]


def _filter_settings(opts):
  """(top_k, top_p) for the scan body: static if uniform, else per scale.

  The traced form returns callables of the scale index that give the int32
  top-k and the (top_p, budget) pair `filtering.keep_mask` takes.
  """
  ks, ps = opts.top_k, opts.top_p
  if len(set(ks)) == 1 and len(set(ps)) == 1:
    return (lambda si: ks[0]), (lambda si: ps[0])
  k_arr = jnp.asarray(ks, jnp.int32)
  p_arr = jnp.asarray(ps, jnp.float32)
  b_arr = jnp.asarray([filtering.top_p_budget(p) for p in ps], jnp.float32)
  return (lambda si: k_arr[si]), (lambda si: (p_arr[si], b_arr[si]))


def run_scan(var, layers, quant, opts, table, labels_B, state, ids_B, edit):
  """All scales of one transformer as one `lax.scan` (paired rows only).

  Arguments as `run_unrolled` (`state.cache` preallocated for 2B rows).
  """
  patch_nums = var.cfg.patch_nums
  lay = layout(patch_nums)
  dtype = jnp.dtype(opts.dtype)
  lmax, seq = lay.lmax, lay.seq_len
  cond = cond_rows(var, labels_B, True)
  lvl_pos = var.lvl_pos()
  # Zero rows past L keep the last scale's (unused) next-input slice in range.
  lvl_pad = jnp.pad(lvl_pos, ((0, 0), (0, lmax), (0, 0)))
  sos = var.sos(cond)
  x0 = jnp.pad(sos, ((0, 0), (0, lmax - sos.shape[1]), (0, 0)))
  starts = jnp.asarray(lay.starts, jnp.int32)
  ends = jnp.asarray(lay.ends, jnp.int32)
  branches = _scale_branches(quant, patch_nums)
  ada = var.adaln_all(cond, layers)
  top_k, top_p = _filter_settings(opts)

  def body(carry, si):
    state, x = carry
    start, end = starts[si], ends[si]
    h, cache = var.decode(x, cond, state.cache, start, seq, dtype,
                          key_limit=end, ada=ada, layers=layers)
    logits = var.logits(h, cond)
    keys = token_keys(state.key, si, ids_B, start + jnp.arange(lmax))
    idx, code, guided = draw(quant, opts, logits, table["mix"][si],
                             table["temperature"][si], keys, top_k(si),
                             top_p(si), True)
    if edit is not None:
      sl = lambda a: jax.lax.dynamic_slice_in_dim(a, start, lmax, axis=1)
      code = apply_edit(quant, code, sl(edit[0]), sl(edit[1]))
    tokens, logits_all = _store(state, start, idx, guided)
    f_hat, nxt = jax.lax.switch(si, branches, state.f_hat_BHWC, code)
    pos = jax.lax.dynamic_slice_in_dim(lvl_pad, end, lmax, axis=1)
    x = _pair_rows(var.word_embed(nxt) + pos)
    state = state.replace(f_hat_BHWC=f_hat, cache=cache, tokens_BL=tokens,
                          logits_BLV=logits_all)
    return (state, x), None

  (state, _), _ = jax.lax.scan(body, (state, x0),
                               jnp.arange(lay.num_scales))
  return state


def decode_images(vae, f_hat_BHWC, batched: bool = True):
  """float32 (B, H, W, 3) in [0, 1]: the VQVAE decoder on the final f_hat.

  `batched=False` decodes one image at a time (`vqvae.one_image_at_a_time`;
  which is faster depends on the CPU, see `cpu_plan`). The official
  `fhat_to_img(f_hat).add_(1).mul_(0.5)`.
  """
  b = f_hat_BHWC.shape[0]
  if b == 1 or batched:
    img = vae.decode(f_hat_BHWC)
  else:
    img = one_image_at_a_time(vae.decode, f_hat_BHWC)
  return (img + 1) * 0.5
