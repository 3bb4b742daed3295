"""Class-conditional next-scale sampling with classifier-free guidance.

One jitted function runs a whole sample: the 2B batch (each sample's
conditional row followed by its null-class row) walks the scale list, each
scale decoding its tokens with the KV cache, mixing the guided logits
`(1 + t) cond - t uncond` with `t = cfg * si / (K - 1)`, filtering, drawing
tokens and folding their codes into f_hat through Phi and bicubic upsampling.
The final f_hat goes through the VQVAE decoder in the same program.

Two equivalent forms of the scale loop:
  * "unrolled": a Python loop at trace time; every scale has static shapes,
    keeps its keys/values as one cache chunk and attends to the chunks so
    far (`VAR.decode_chunks`).
  * "scan": one `lax.scan` step per scale with fixed shapes. Every scale is
    padded to the largest scale's token count `lmax`, written at its dynamic
    start; keys at or past the scale's end are masked. Because every start is
    at most the last scale's start, start + lmax <= L: the padded writes never
    leave the cache, and the junk they leave past `end` is overwritten by the
    next scale before anyone can attend to it. Token ids and logits use the
    same scheme.

Either form applies the blocks as a scan over the stacked layer weights or
as a Python loop over per-layer copies (`SampleOptions.layer_loop`).

Randomness is a pure function of (seed, scale, global sample index, token
position): each token has its own key, so the same seed gives the same images
for any batch split and either form.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.models import quantizer
from var_jax.models.transformer import KVCache
from var_jax.models.vqvae import one_image_at_a_time
from var_jax.sampling import filtering
from var_jax.errors import UserError

FORMS = ("unrolled", "scan")
DEFAULT_FORM = "unrolled"  # Faster on CPU (see README / bench figures).
LAYER_LOOPS = ("scan", "unrolled")
DEFAULT_LAYER_LOOP = "unrolled"  # Faster on CPU (see README / bench figures).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """Static sampling settings; each distinct value compiles once."""

  cfg: float = 1.5
  top_k: int = 900
  top_p: float = 0.96
  more_smooth: bool = False
  dtype: str = "float32"  # Transformer matmul compute dtype.
  form: str = DEFAULT_FORM
  # "scan": blocks applied by a scan over the stacked layer parameters (one
  # block compiled per scale); "unrolled": a Python loop over per-layer
  # copies of the block weights (compiles depth times more code, avoids
  # copying each layer's weights out of the stack at every scale).
  layer_loop: str = DEFAULT_LAYER_LOOP
  collect_logits: bool = False  # Also return the guided logits (tests).

  def __post_init__(self):
    if self.form not in FORMS:
      raise UserError(f"form must be one of {FORMS}, got {self.form!r}")
    if self.layer_loop not in LAYER_LOOPS:
      raise UserError(f"layer_loop must be one of {LAYER_LOOPS}, "
                       f"got {self.layer_loop!r}")
    if self.dtype not in DTYPES:
      raise UserError(f"dtype must be one of {tuple(DTYPES)}")


@flax.struct.dataclass
class SampleState:
  """What the scale loop carries besides the next input."""

  f_hat_BHWC: jax.Array  # Accumulated latent at the last scale's size.
  # Keys/values of every layer for the 2B rows: preallocated for all L
  # positions (scan form), or one chunk per finished scale (unrolled form).
  cache: KVCache | tuple
  key: jax.Array  # Base key of the token draws (folded, never advanced).
  tokens_BL: jax.Array  # int32 ids of all scales, concatenated.
  logits_BLV: jax.Array | None  # Guided logits when collected, else None.


class SampleOut(NamedTuple):
  idx: list  # Token ids per scale, (B, pn*pn) int32.
  images_BHWC: jax.Array  # float32 in [0, 1].
  labels_B: jax.Array  # The classes used (drawn when none were given).
  logits: list | None  # Guided logits per scale (B, pn*pn, V) if collected.


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static per-scale tables, in float64 then rounded like the reference."""

  patch_nums: tuple[int, ...]

  @property
  def k(self):
    return len(self.patch_nums)

  @functools.cached_property
  def starts(self):
    return np.cumsum([0] + [p * p for p in self.patch_nums[:-1]])

  @property
  def seq_len(self):
    return sum(p * p for p in self.patch_nums)

  @property
  def lmax(self):
    return max(p * p for p in self.patch_nums)

  def ratio(self, si):
    return si / (self.k - 1) if self.k > 1 else 0.0

  def mix_table(self, cfg: float) -> np.ndarray:
    """(K, 4) float32 per scale: 1 + t, t, 1 + ratio, Gumbel tau.

    Computed in float64 and rounded once, as the reference's Python floats.
    """
    rows = []
    for si in range(self.k):
      r = self.ratio(si)
      t = cfg * r
      rows.append((1 + t, t, 1 + r, filtering.gumbel_temperature(r)))
    return np.asarray(rows, np.float32)


def _token_keys(key, si, ids_B, pos_l):
  """(B, l) keys: key folded with the scale, the sample index, the position."""
  k_si = jax.random.fold_in(key, si)
  per_b = jax.vmap(lambda i: jax.random.fold_in(k_si, i))(ids_B)
  return jax.vmap(lambda kb: jax.vmap(
      lambda p: jax.random.fold_in(kb, p))(pos_l))(per_b)


def _draw(quant, opts, logits_2BlV, mix, keys_Bl):
  """Guided mix, filtering and the draw: (ids (B, l), codes (B, l, C), mix).

  `mix` is one row of `_Plan.mix_table` (static or traced).
  """
  b2, l, v = logits_2BlV.shape
  pair = logits_2BlV.reshape(b2 // 2, 2, l, v)
  guided = mix[0] * pair[:, 0] - mix[1] * pair[:, 1]
  filtered = filtering.filter_logits(guided, opts.top_k, opts.top_p)
  idx_Bl = filtering.categorical(keys_Bl, filtered)
  if opts.more_smooth:
    g_keys = jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, 1)))(keys_Bl)
    h_BlC = filtering.gumbel_soft_embed(g_keys, filtered, quant.codebook_VC,
                                        mix[2], mix[3])
  else:
    h_BlC = jnp.take(quant.codebook_VC, idx_Bl, axis=0)
  return idx_Bl, h_BlC, guided


def _apply_edit(quant, h_BlC, given_Bl, keep_Bl):
  """Keeps the given codes where `keep` (the notebook's replace_embedding).

  Only the code vectors are replaced; the recorded ids stay the drawn ones,
  as in the notebook (where(keep, given, drawn) gives the edited image's ids).
  """
  if given_Bl is None:
    return h_BlC
  gt_h = jnp.take(quant.codebook_VC, given_Bl, axis=0)
  return jnp.where(keep_Bl[..., None], gt_h, h_BlC)


def _cfg_rows(x_BlC):
  """Duplicates each sample's input for its conditional and null rows."""
  return jnp.repeat(x_BlC, 2, axis=0)


def _init(var, plan, opts, labels_B, key, batch):
  cfg = var.cfg
  null = jnp.full_like(labels_B, cfg.num_classes)
  cond_2BD = var.class_emb(jnp.stack([labels_B, null], axis=1).reshape(-1))
  dtype = DTYPES[opts.dtype]
  c = cfg.cvae
  hw = plan.patch_nums[-1]
  logits = (jnp.zeros((batch, plan.seq_len, cfg.vocab_size), jnp.float32)
            if opts.collect_logits else None)
  state = SampleState(
      f_hat_BHWC=jnp.zeros((batch, hw, hw, c), jnp.float32),
      cache=(KVCache.zeros(cfg, 2 * batch, dtype) if opts.form == "scan"
             else ()),
      key=key,
      tokens_BL=jnp.zeros((batch, plan.seq_len), jnp.int32), logits_BLV=logits)
  return cond_2BD, state


def _store(state, start, idx_Bl, guided_BlV):
  tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens_BL, idx_Bl, start,
                                               axis=1)
  logits = state.logits_BLV
  if logits is not None:
    logits = jax.lax.dynamic_update_slice_in_dim(logits, guided_BlV, start,
                                                 axis=1)
  return tokens, logits


def _run_unrolled(var, layers, quant, plan, opts, mix, cond_2BD, state, ids_B,
                  edit):
  dtype = DTYPES[opts.dtype]
  lvl_pos = var.lvl_pos()
  ada = var.adaln_all(cond_2BD, layers)
  x = var.sos(cond_2BD)
  for si, pn in enumerate(plan.patch_nums):
    start, end = int(plan.starts[si]), int(plan.starts[si]) + pn * pn
    h, chunk = var.decode_chunks(x, cond_2BD, state.cache, dtype, ada=ada,
                                 layers=layers)
    cache = state.cache + (chunk,)
    logits = var.logits(h, cond_2BD)
    keys = _token_keys(state.key, si, ids_B, jnp.arange(start, end))
    idx, code, guided = _draw(quant, opts, logits, mix[si], keys)
    given, keep = ((None, None) if edit is None else
                   (edit[0][:, start:end], edit[1][:, start:end]))
    code = _apply_edit(quant, code, given, keep)
    tokens, logits_all = _store(state, start, idx, guided)
    f_hat, nxt = quantizer.next_ar_input(
        quant, si, state.f_hat_BHWC, code.reshape(-1, pn, pn, code.shape[-1]),
        plan.patch_nums)
    state = state.replace(f_hat_BHWC=f_hat, cache=cache, tokens_BL=tokens,
                          logits_BLV=logits_all)
    if si + 1 < plan.k:
      nxt = nxt.reshape(nxt.shape[0], -1, nxt.shape[-1])
      nl = plan.patch_nums[si + 1] ** 2
      x = _cfg_rows(var.word_embed(nxt) + lvl_pos[:, end:end + nl])
  return state


def _scale_branches(quant, plan):
  """One `lax.switch` branch per scale: add its codes, build the next map."""
  b_pad = plan.lmax

  def make(si):
    pn = plan.patch_nums[si]

    def branch(f_hat, code_BlC):
      b, _, c = code_BlC.shape
      h = code_BlC[:, :pn * pn].reshape(b, pn, pn, c)
      f_hat, nxt = quantizer.next_ar_input(quant, si, f_hat, h,
                                           plan.patch_nums)
      if si + 1 == plan.k:
        return f_hat, jnp.zeros((b, b_pad, c), f_hat.dtype)
      nxt = nxt.reshape(b, -1, c)
      return f_hat, jnp.pad(nxt, ((0, 0), (0, b_pad - nxt.shape[1]), (0, 0)))

    return branch

  return [make(si) for si in range(plan.k)]


def _run_scan(var, layers, quant, plan, opts, mix, cond_2BD, state, ids_B,
              edit):
  dtype = DTYPES[opts.dtype]
  lmax, seq = plan.lmax, plan.seq_len
  lvl_pos = var.lvl_pos()
  # Zero rows past L let the last scale's (unused) next-input slice stay in range.
  lvl_pad = jnp.pad(lvl_pos, ((0, 0), (0, lmax), (0, 0)))
  sos = var.sos(cond_2BD)
  x0 = jnp.pad(sos, ((0, 0), (0, lmax - sos.shape[1]), (0, 0)))
  starts = jnp.asarray(plan.starts, jnp.int32)
  ends = starts + jnp.asarray([p * p for p in plan.patch_nums], jnp.int32)
  branches = _scale_branches(quant, plan)
  ada = var.adaln_all(cond_2BD, layers)

  def body(carry, si):
    state, x = carry
    start, end = starts[si], ends[si]
    h, cache = var.decode(x, cond_2BD, state.cache, start, seq, dtype,
                          key_limit=end, ada=ada, layers=layers)
    logits = var.logits(h, cond_2BD)
    keys = _token_keys(state.key, si, ids_B, start + jnp.arange(lmax))
    idx, code, guided = _draw(quant, opts, logits, mix[si], keys)
    if edit is not None:
      sl = lambda a: jax.lax.dynamic_slice_in_dim(a, start, lmax, axis=1)
      code = _apply_edit(quant, code, sl(edit[0]), sl(edit[1]))
    tokens, logits_all = _store(state, start, idx, guided)
    f_hat, nxt = jax.lax.switch(si, branches, state.f_hat_BHWC, code)
    pos = jax.lax.dynamic_slice_in_dim(lvl_pad, end, lmax, axis=1)
    x = _cfg_rows(var.word_embed(nxt) + pos)
    state = state.replace(f_hat_BHWC=f_hat, cache=cache, tokens_BL=tokens,
                          logits_BLV=logits_all)
    return (state, x), None

  (state, _), _ = jax.lax.scan(body, (state, x0), jnp.arange(plan.k))
  return state


def _decode_images(vae, f_hat_BHWC):
  """The VQVAE decoder; on CPU one image at a time (see one_image_at_a_time)."""
  b = f_hat_BHWC.shape[0]
  if b == 1 or jax.default_backend() != "cpu":
    return vae.decode(f_hat_BHWC)
  return one_image_at_a_time(vae.decode, f_hat_BHWC)


def _split_var(var, layer_loop):
  """(graphdef, state) for `_sample_jit`.

  For the unrolled layer loop the state is (rest, per-layer block states):
  every layer's weights become separate buffers, a one-time copy of the
  blocks (the caller's model keeps its stacked arrays).
  """
  if layer_loop == "scan":
    return nnx.split(var)
  var_def, blocks, rest = nnx.split(var, nnx.PathContains("blocks"), ...)
  layers = [jax.tree.map(lambda a, i=i: a[i], blocks)
            for i in range(var.cfg.depth)]
  return var_def, (rest, layers)


def _merge_var(var_def, var_state):
  """Inverse of `_split_var`: (model, per-layer parameter dicts or None)."""
  if not isinstance(var_state, tuple):
    return nnx.merge(var_def, var_state), None
  rest, layers = var_state
  # The stacked blocks exist only to rebuild the module; the sampler never
  # reads them (it gets `layers`), so XLA drops the stacking as dead code.
  blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  var = nnx.merge(var_def, blocks, rest)
  return var, [nnx.to_pure_dict(st)["blocks"] for st in layers]


@functools.partial(jax.jit, static_argnames=("var_def", "vae_def", "opts",
                                             "patch_nums"))
def _sample_jit(var_state, vae_state, mix_K4, labels_B, key, ids_B, given_BL,
                keep_BL, *, var_def, vae_def, opts, patch_nums):
  var, layers = _merge_var(var_def, var_state)
  vae = nnx.merge(vae_def, vae_state)
  plan = _Plan(patch_nums)
  batch = ids_B.shape[0]
  k_labels, k_tokens = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
  if labels_B is None:
    labels_B = jax.vmap(lambda i: jax.random.randint(
        jax.random.fold_in(k_labels, i), (), 0, var.cfg.num_classes))(ids_B)
  labels_B = labels_B.astype(jnp.int32)
  cond_2BD, state = _init(var, plan, opts, labels_B, k_tokens, batch)
  edit = None if given_BL is None else (given_BL.astype(jnp.int32), keep_BL)
  run = _run_scan if opts.form == "scan" else _run_unrolled
  state = run(var, layers, vae.quantize, plan, opts, mix_K4, cond_2BD, state,
              ids_B, edit)
  images = (_decode_images(vae, state.f_hat_BHWC) + 1) * 0.5
  return state.tokens_BL, images, labels_B, state.logits_BLV


def _split_scales(a_BL, patch_nums):
  if a_BL is None:
    return None
  out, cur = [], 0
  for pn in patch_nums:
    out.append(a_BL[:, cur:cur + pn * pn])
    cur += pn * pn
  return out


class Sampler:
  """Sampling for one (VQVAE, VAR) pair and one set of options.

  Calls with equal shapes, models of equal structure and equal options reuse
  one compiled program.
  """

  def __init__(self, vae, var, opts: SampleOptions = SampleOptions()):
    self.opts = opts
    self.cfg = var.cfg
    self.patch_nums = tuple(var.cfg.patch_nums)
    self._var_def, self.var_state = _split_var(var, opts.layer_loop)
    self._vae_def, self.vae_state = nnx.split(vae)

  def _args(self, labels_B, seed, ids_B, given_BL, keep_BL):
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    # cfg enters as data (the mix table), so changing it does not recompile.
    kw = dict(var_def=self._var_def, vae_def=self._vae_def,
              opts=dataclasses.replace(self.opts, cfg=0.0),
              patch_nums=self.patch_nums)
    mix = _Plan(self.patch_nums).mix_table(self.opts.cfg)
    return (self.var_state, self.vae_state, mix, labels_B, key, ids_B,
            given_BL, keep_BL), kw

  def lower(self, batch: int, *, random_labels: bool = False,
            edit: bool = False):
    """AOT-lowers the program for `batch` (for compile timing and costs)."""
    i32 = jax.ShapeDtypeStruct((batch,), jnp.int32)
    seq = sum(p * p for p in self.patch_nums)
    given = jax.ShapeDtypeStruct((batch, seq), jnp.int32) if edit else None
    keep = jax.ShapeDtypeStruct((batch, seq), bool) if edit else None
    args, kw = self._args(None if random_labels else i32, 0, i32, given, keep)
    return _sample_jit.lower(*args, **kw)

  def compile(self, batch: int):
    """AOT-compiles the plain (given labels, no edit) program for `batch`.

    Returns `run(labels_B, seed, ids_B)` -> the `run_arrays` outputs, which
    calls the compiled executable directly (benchmarks time compilation and
    execution separately this way).
    """
    compiled = self.lower(batch).compile()

    def run(labels_B, seed, ids_B):
      args, _ = self._args(jnp.asarray(labels_B, jnp.int32), seed,
                           jnp.asarray(ids_B, jnp.int32), None, None)
      return compiled(*args)

    return run

  def run_arrays(self, labels_B, seed, ids_B, given_BL=None, keep_BL=None):
    """Raw jitted call: (tokens (B, L), images, labels, logits or None).

    Arrays may carry shardings (e.g. the batch split over a mesh); the
    program follows them.
    """
    args, kw = self._args(labels_B, seed, ids_B, given_BL, keep_BL)
    return _sample_jit(*args, **kw)

  def __call__(self, labels=None, *, batch: int | None = None, seed: int = 0,
               offset: int = 0, given=None, keep_BL=None) -> SampleOut:
    """Samples one batch.

    Args:
      labels: class ids (B,); `num_classes` is the null class
        (unconditional). None draws uniform random classes per sample.
      batch: the batch size when `labels` is None.
      seed: the run's seed; with `offset` it fixes every sample.
      offset: global index of this batch's first sample, so that a run split
        into batches gives the same samples as one big batch.
      given: token ids per scale to keep where `keep_BL` (zero-shot edits).
      keep_BL: bool (B, L), True where the given token is kept.
    """
    if labels is not None:
      labels = jnp.asarray(labels, jnp.int32).reshape(-1)
      batch = labels.shape[0]
    if batch is None:
      raise UserError("pass labels or batch")
    ids_B = jnp.arange(offset, offset + batch, dtype=jnp.int32)
    given_BL = None
    if given is not None:
      given_BL = jnp.concatenate([jnp.asarray(g, jnp.int32) for g in given], 1)
      keep_BL = jnp.asarray(keep_BL, bool)
    tokens, images, labels, logits = self.run_arrays(labels, seed, ids_B,
                                                     given_BL, keep_BL)
    return SampleOut(_split_scales(tokens, self.patch_nums), images, labels,
                     _split_scales(logits, self.patch_nums))


def sample(vae, var, labels=None, *, batch=None, seed=0, offset=0,
           opts: SampleOptions = SampleOptions()) -> SampleOut:
  """One-shot convenience wrapper around `Sampler`."""
  return Sampler(vae, var, opts)(labels, batch=batch, seed=seed,
                                 offset=offset)
