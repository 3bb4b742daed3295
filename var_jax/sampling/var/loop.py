"""The scale loop of next-scale sampling: one scale step, driven two ways.

A scale step embeds the scale's input (the start tokens at scale 0, else
f_hat area-resized to the scale's side), runs the transformer against the KV
cache, mixes the guided logits `(1 + t) cond - t uncond` with `t = cfg * si /
(K - 1)`, filters them (top-k, top-p), divides by the temperature, draws one
token per position and adds the chosen codes to f_hat through bicubic
upsampling and Phi. This is the loop of the official
`VAR.autoregressive_infer_cfg` (FoundationVision VAR `models/var.py`).

`run` steps over consecutive scales in groups (`scale_groups`):
  * "python": every scale is its own group, stepped at trace time with its
    exact shapes; each scale's keys/values become one cache chunk. Largest
    program, least work.
  * "scan": runs of similar-sized scales share one `lax.scan` whose steps are
    padded to the run's largest scale; the run's keys/values go into one
    buffer (written at each scale's offset, positions past the scale hidden)
    that becomes a chunk when the run ends. A fraction of the program, at
    most `MAX_PAD_TOKENS` padded tokens per step.
Both call `_step`, and draw the same tokens.

Rows: while guidance is on, every sample has two rows, its conditional row
followed by its null-class row (2B rows). From scale `cfg_until` on, the null
rows (and their keys/values) are dropped and the scales run B rows.

Randomness is a pure function of (seed, scale, global sample index, token
position): the same seed gives the same tokens for any batch split, either
driver, and whichever model of a collaborative pair draws a scale.
"""

from __future__ import annotations

from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from var_jax.sampling.keys import token_keys
from var_jax.models.interp import area_resize
from var_jax.models.scales import layout
from var_jax.models.var import quantizer
from var_jax.models.var.transformer import KVCache
from var_jax.models.var.vqvae import one_image_at_a_time
from var_jax.sampling import filtering
from var_jax.sampling.var.options import SCALE_LOOPS  # noqa: F401

# A scan step carries at most this many padded tokens beyond the scale's own
# (a scale joins the run before it while the padding stays within this bound
# or an eighth of the run's real tokens).
MAX_PAD_TOKENS = 64


@flax.struct.dataclass
class LoopState:
  """What the scale loop carries from scale to scale (besides the cache)."""

  f_hat_BHWC: jax.Array  # float32 (B, pn_K, pn_K, Cvae), accumulated latent.
  tokens_BL: jax.Array  # int32 (B, L) ids of all scales, concatenated.


class Context(NamedTuple):
  """What every step of one model's run reads (trace-time constants)."""

  var: object  # The VAR drawing these scales.
  quant: object  # The VQVAE quantizer (codebook, Phi).
  opts: object  # Static `SampleOptions`, per-scale tuples resolved.
  table: dict  # `scale_table(...)`, as data.
  labels_B: jax.Array
  ids_B: jax.Array  # Global sample indices (for the keys).
  key: jax.Array  # Base key of the token draws (folded, never advanced).
  edit: tuple | None  # (given_BL int32, keep_BL bool) or None.


def init_state(patch_nums, cvae: int, batch: int) -> LoopState:
  hw = patch_nums[-1]
  return LoopState(jnp.zeros((batch, hw, hw, cvae), jnp.float32),
                   jnp.zeros((batch, layout(patch_nums).seq_len), jnp.int32))


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


def scale_groups(patch_nums, scales: range, scale_loop: str,
                 breaks=()) -> tuple[tuple[int, ...], ...]:
  """The groups `run` steps over `scales` in (see the module docstring).

  A group never crosses a scale in `breaks` (where the rows change), and a
  run that starts after scale 0 starts with a group of its own (the prefill).
  """
  lengths = layout(patch_nums).lengths
  groups = []
  for si in scales:
    prefill = bool(groups) and groups[-1][0] == scales[0] > 0
    if scale_loop == "scan" and groups and si not in breaks and not prefill:
      g = groups[-1]
      real = sum(lengths[s] for s in g) + lengths[si]
      if (len(g) + 1) * lengths[si] - real <= max(MAX_PAD_TOKENS, real // 8):
        groups[-1] = g + (si,)
        continue
    groups.append((si,))
  return tuple(groups)


def _pair_rows(x_BlC):
  """Duplicates each sample's input for its conditional and null rows."""
  return jnp.repeat(x_BlC, 2, axis=0)


def _cond_only(a, axis=0):
  """Keeps the conditional rows (even indices) of a paired array."""
  return jax.lax.slice_in_dim(a, 0, a.shape[axis], 2, axis=axis)


def draw(quant, more_smooth: bool, logits_RlV, mix, temperature, keys_Bl,
         top_k, top_p, paired: bool):
  """Guided mix, filtering and the draw of one scale.

  Args:
    quant: the VQVAE quantizer (codebook).
    more_smooth: Gumbel-softmax code vectors instead of the drawn codes.
    logits_RlV: float32 logits of the rows, (2B, l, V) paired or (B, l, V).
    mix: one row of `scale_table(...)["mix"]`; temperature: its scalar.
    keys_Bl: one key per token.
    top_k, top_p: this scale's filter settings (see `filtering.keep_mask`).
    paired: whether the rows hold (cond, null) pairs.

  Returns:
    ids (B, l) int32 and code vectors (B, l, Cvae) float32.
  """
  if paired:
    r, l, v = logits_RlV.shape
    pair = logits_RlV.reshape(r // 2, 2, l, v)
    guided = mix[0] * pair[:, 0] - mix[1] * pair[:, 1]
  else:
    guided = logits_RlV
  filtered = filtering.filter_logits(guided, top_k, top_p)
  idx_Bl = filtering.categorical(keys_Bl, filtered, temperature)
  if more_smooth:
    # Smoothing uses the untempered filtered logits, as CoDe's reference.
    g_keys = jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, 1)))(keys_Bl)
    h_BlC = filtering.gumbel_soft_embed(g_keys, filtered, quant.codebook_VC,
                                        mix[2], mix[3])
  else:
    h_BlC = jnp.take(quant.codebook_VC, idx_Bl, axis=0)
  return idx_Bl, h_BlC


class _Group(NamedTuple):
  """Trace-time facts of one group of scales."""

  scales: tuple[int, ...]
  start: int  # First position of the group's first scale.
  width: int  # Tokens per step: the largest scale's.
  paired: bool

  def at(self, values, j):
    """values[scales[j]]: static for a static j or a value uniform over the
    group, else a traced lookup."""
    if isinstance(j, int):
      return values[self.scales[j]]
    mine = [values[s] for s in self.scales]
    if all(v == mine[0] for v in mine):
      return mine[0]
    return jnp.asarray(mine)[j]

  def switch(self, j, make, *args):
    """make(si)(*args) for the group's j-th scale (lax.switch when traced)."""
    if isinstance(j, int):
      return make(self.scales[j])(*args)
    return jax.lax.switch(j, [make(s) for s in self.scales], *args)


def _raw_input(ctx, g, j, f_hat_BHWC):
  """Scale j's raw input (B, width, Cvae): f_hat area-resized to its side.

  Zeros for scale 0, whose input is the start tokens.
  """
  patch_nums = ctx.var.cfg.patch_nums

  def make(si):
    def branch(f_hat):
      b, c = f_hat.shape[0], f_hat.shape[-1]
      if si == 0:
        return jnp.zeros((b, g.width, c), f_hat.dtype)
      x = area_resize(f_hat, patch_nums[si]).reshape(b, -1, c)
      return jnp.pad(x, ((0, 0), (0, g.width - x.shape[1]), (0, 0)))
    return branch

  return g.switch(j, make, f_hat_BHWC)


def _add_codes(ctx, g, j, f_hat_BHWC, code_BlC):
  """f_hat plus scale j's codes, upsampled and passed through Phi."""
  patch_nums = ctx.var.cfg.patch_nums

  def make(si):
    def branch(f_hat, code):
      pn = patch_nums[si]
      h = code[:, :pn * pn].reshape(code.shape[0], pn, pn, code.shape[-1])
      return quantizer.next_ar_input(ctx.quant, si, f_hat, h, patch_nums)[0]
    return branch

  return g.switch(j, make, f_hat_BHWC, code_BlC)


def _finish(ctx, g, j, state, h_RlC, cond_RD):
  """Draws scale j's tokens from the hidden states and adds them to f_hat."""
  var, opts = ctx.var, ctx.opts
  si = g.at(range(len(var.cfg.patch_nums)), j)
  start = g.at(layout(var.cfg.patch_nums).starts, j)
  logits = var.logits(h_RlC, cond_RD)
  keys = token_keys(ctx.key, si, ctx.ids_B, start + jnp.arange(g.width))
  top_p = g.at(opts.top_p, j)
  if not filtering.is_static(top_p):  # Traced: with its float32 budget.
    top_p = (top_p, g.at([filtering.top_p_budget(p) for p in opts.top_p], j))
  idx, code = draw(ctx.quant, opts.more_smooth, logits, ctx.table["mix"][si],
                   ctx.table["temperature"][si], keys, g.at(opts.top_k, j),
                   top_p, g.paired)
  if ctx.edit is not None:
    given, keep = (jax.lax.dynamic_slice_in_dim(a, start, g.width, axis=1)
                   for a in ctx.edit)
    # Only the code vectors are replaced; the recorded ids stay the drawn
    # ones, as in the official notebook.
    code = jnp.where(keep[..., None],
                     jnp.take(ctx.quant.codebook_VC, given, axis=0), code)
  tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens_BL, idx, start,
                                               axis=1)
  return LoopState(_add_codes(ctx, g, j, state.f_hat_BHWC, code), tokens)


def _step(ctx, g, j, state, cond_RD, ada, past, buf):
  """One scale (the j-th of group g): the transformer, then the draw.

  Returns the state, the scale's raw input (for a collaborative hand-over)
  and its keys/values: the new chunk (buf None) or the updated buffer.
  """
  var = ctx.var
  lay = layout(var.cfg.patch_nums)
  si = g.at(range(lay.num_scales), j)
  start, end = g.at(lay.starts, j), g.at(lay.ends, j)
  raw = _raw_input(ctx, g, j, state.f_hat_BHWC)
  if isinstance(si, int) and si == 0:  # A scale-0 step of its own.
    x = var.sos(cond_RD)
  else:
    rows = _pair_rows if g.paired else (lambda a: a)
    pos = jax.lax.dynamic_slice_in_dim(var.lvl_pos(), start, g.width, axis=1)
    x = rows(var.word_embed(raw)) + pos
    if 0 in g.scales:  # A scan step that may be scale 0.
      sos = var.sos(cond_RD)
      sos = jnp.pad(sos, ((0, 0), (0, g.width - sos.shape[1]), (0, 0)))
      x = jnp.where(si == 0, sos, x)
  dtype = jnp.dtype(ctx.opts.dtype)
  if buf is None:
    h, kv = var.decode(x, ada, past, dtype)
  else:
    h, kv = var.decode(x, ada, past, dtype,
                       buffer=(buf, start - g.start, end - g.start))
  return _finish(ctx, g, j, state, h, cond_RD), raw, kv


def _prefill(ctx, g, state, cond_RD, ada, hub_BLC):
  """A run's first scale N > 0 from another model's inputs of scales 1..N.

  One block-causal pass fills the cache with every position up to scale N
  and gives scale N's hidden states (CoDe's refiner).
  """
  var = ctx.var
  patch_nums = var.cfg.patch_nums
  si = g.scales[0]
  start, end = layout(patch_nums).begin_ends[si]
  rows = _pair_rows if g.paired else (lambda a: a)
  x = jnp.concatenate([
      var.sos(cond_RD),
      rows(var.word_embed(hub_BLC)) + var.lvl_pos()[:, var.cfg.first_l:end]],
                      axis=1)
  h, chunk = var.prefill(x, ada, patch_nums[:si + 1],
                         jnp.dtype(ctx.opts.dtype))
  return _finish(ctx, g, 0, state, h[:, start:], cond_RD), chunk


def run(ctx: Context, scales: range, state: LoopState, scale_loop: str,
        hub_BLC=None):
  """Draws `scales` (consecutive) with one model.

  Args:
    ctx: the model and the run's constants.
    scales: e.g. range(K), or a collaborative pair's range(N) and
      range(N, K).
    state: f_hat and tokens of the scales before `scales[0]`.
    scale_loop: "python" or "scan" (see the module docstring).
    hub_BLC: for a run starting at N > 0, the raw inputs of scales 1..N
      concatenated (B, ends[N] - first_l, Cvae), as the model that drew
      scales < N built them (CoDe's `token_hub`).

  Returns:
    The state after the last scale and, for a run from scale 0 that stops
    at N - 1 < K - 1, the raw inputs of scales 1..N concatenated (what the
    run from N takes as `hub_BLC`); else None.
  """
  var, opts = ctx.var, ctx.opts
  patch_nums = var.cfg.patch_nums
  lay = layout(patch_nums)
  paired = scales[0] < opts.cfg_until
  cond = var.class_emb(ctx.labels_B)
  if paired:
    null = jnp.full_like(ctx.labels_B, var.cfg.num_classes)
    cond = var.class_emb(jnp.stack([ctx.labels_B, null], 1).reshape(-1))
  ada = var.adaln_all(cond)
  past, inputs = (), []  # inputs: raw inputs of the scales after 0.
  for scales_g in scale_groups(patch_nums, scales, scale_loop,
                               (opts.cfg_until,)):
    if paired and scales_g[0] >= opts.cfg_until:  # Guidance ends here.
      paired = False
      cond, ada = _cond_only(cond), _cond_only(ada, axis=1)
      past = tuple(ch.rows(_cond_only) for ch in past)
    width = lay.lengths[scales_g[-1]]
    g = _Group(scales_g, lay.starts[scales_g[0]], width, paired)
    if scales_g[0] == scales[0] and scales[0] > 0:
      state, chunk = _prefill(ctx, g, state, cond, ada, hub_BLC)
    elif len(scales_g) == 1:
      state, raw, chunk = _step(ctx, g, 0, state, cond, ada, past, None)
      inputs += [raw] if scales_g[0] > 0 else []
    else:
      rows_n, heads = cond.shape[0], var.cfg.num_heads
      n = lay.ends[scales_g[-1]] - g.start
      shape = (var.cfg.depth, rows_n, heads, n, var.cfg.head_dim)
      zeros = jnp.zeros(shape, jnp.dtype(opts.dtype))

      def body(carry, j, g=g, cond=cond, ada=ada, past=past):
        st, buf = carry
        st, raw, buf = _step(ctx, g, j, st, cond, ada, past, buf)
        return (st, buf), raw

      (state, buf), raws = jax.lax.scan(
          body, (state, KVCache(zeros, zeros)), jnp.arange(len(scales_g)))
      chunk = buf
      inputs += [raws[j, :, :lay.lengths[s]] for j, s in enumerate(scales_g)
                 if s > 0]
    past = past + (chunk,)
  if scales[0] > 0 or scales[-1] + 1 == lay.num_scales:
    return state, None
  b, c = state.f_hat_BHWC.shape[0], state.f_hat_BHWC.shape[-1]
  inputs.append(area_resize(state.f_hat_BHWC,
                            patch_nums[scales[-1] + 1]).reshape(b, -1, c))
  return state, jnp.concatenate(inputs, axis=1)


def decode_images(vae, f_hat_BHWC, batched: bool = True):
  """float32 (B, H, W, 3) in [0, 1]: the VQVAE decoder on the final f_hat.

  `batched=False` decodes one image at a time (`vqvae.one_image_at_a_time`;
  which is faster depends on the CPU, see `var_jax.sampling.tuning`). The
  official `fhat_to_img(f_hat).add_(1).mul_(0.5)`.
  """
  if f_hat_BHWC.shape[0] == 1 or batched:
    img = vae.decode(f_hat_BHWC)
  else:
    img = one_image_at_a_time(vae.decode, f_hat_BHWC)
  return (img + 1) * 0.5
