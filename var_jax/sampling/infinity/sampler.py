"""Text to image with Infinity: a KV-cached loop over a scale schedule.

`InfinitySampler(model, vae, options)(text_BTc, mask_BT, seed=, grids=)`
draws d bits per token, scale by scale, and decodes the summed codes.

One scale (`step`): the scale's input tokens (the start token at scale 0,
else the running code sum resized to the grid) run through every block
with the keys/values of the earlier scales; classifier-free guidance mixes
either the logits (`cfg_insertion_layer=0`: cfg * cond + (1 - cfg) *
uncond, then / tau) or the hidden states after block depth + n (n < 0);
each bit's two logits are filtered (top-k, top-p) and a class drawn with
the token's own key (folded from the seed, the scale, the sample's index and
the position), so a batch split changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.errors import UserError
from var_jax.models import interp
from var_jax.models.infinity import bsq, schedules
from var_jax.models.infinity.config import SAMPLING_DTYPES
from var_jax.models.infinity.transformer import Condition, Infinity
from var_jax.sampling import filtering
from var_jax.sampling.keys import token_keys


# The block matrices a bfloat16 sampler stores in bfloat16.
_MATRICES = ("qkv", "proj", "ca_q", "ca_kv", "ca_proj", "fc1", "fc2")


def _per_scale(name, value, n: int) -> tuple[float, ...]:
  vals = tuple(value) if isinstance(value, Sequence) else (value,) * n
  if len(vals) != n or not all(isinstance(v, (int, float)) and
                               not isinstance(v, bool) and math.isfinite(v)
                               for v in vals):
    raise UserError(f"{name} must be a finite number or {n} of them (one "
                    f"per scale), got {value!r}")
  return tuple(float(v) for v in vals)


@dataclasses.dataclass(frozen=True)
class InfinityOptions:
  """How to draw. `cfg` and `tau` are a number or one per scale."""

  cfg: float | tuple[float, ...] = 3.0
  tau: float | tuple[float, ...] = 0.5
  top_k: int = 900
  top_p: float = 0.97
  # 0: guidance on the logits; n < 0: on the hidden states after block
  # depth + n.
  cfg_insertion_layer: int = 0
  # The blocks' matrices and the KV cache: float32 or bfloat16 (summed in
  # float32 either way; the text, the head and the tokenizer stay float32).
  dtype: str = "float32"

  def per_scale(self, n: int, depth: int):
    """(cfg, tau) tuples of `n` scales, checked.

    Raises:
      UserError: a bad value, named.
    """
    cfg, tau = _per_scale("cfg", self.cfg, n), _per_scale("tau", self.tau, n)
    if any(t <= 0 for t in tau):
      raise UserError(f"tau must be > 0, got {self.tau!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise UserError(f"top_k must be an integer >= 0, got {self.top_k!r}")
    if not 0.0 <= self.top_p <= 1.0:
      raise UserError(f"top_p must be in [0, 1], got {self.top_p!r}")
    layer = self.cfg_insertion_layer
    if not isinstance(layer, int) or not -depth <= layer <= 0:
      raise UserError(f"cfg_insertion_layer must be 0 (logits) or -1 .. "
                      f"-{depth} (after a block), got {layer!r}")
    return cfg, tau


def filter_bits(logits_BlV, top_k: int, top_p: float):
  """Each bit's two logits with top-k / top-p applied (-inf removed)."""
  b, l, v = logits_BlV.shape
  pairs = logits_BlV.reshape(b, l, v // 2, 2)
  keep = filtering.keep_mask(pairs, top_k, top_p)
  return jnp.where(keep, pairs, -jnp.inf)


def draw_bits(masked_Bld2, noise_Bld2):
  """The class of each bit drawn with Exp(1) noise: argmax p / E is a draw
  from p."""
  p = jax.nn.softmax(masked_Bld2, -1)
  return jnp.argmax(p / noise_Bld2, -1).astype(jnp.int32)


def bit_noise(key, si: int, ids_B, length: int, d: int):
  """(B, l, d, 2) Exp(1) noise from each token's own key."""
  keys = token_keys(key, si, ids_B, jnp.arange(length))
  return jax.vmap(jax.vmap(lambda k: jax.random.exponential(
      k, (d, 2))))(keys)


def mix(a, cfg: float, batch: int):
  """Guidance of paired rows (conditional first): cfg * cond + (1 - cfg) *
  uncond."""
  return cfg * a[:batch] + (1 - cfg) * a[batch:]


def cast(x, dtype):
  """`x` in `dtype`; an abstract value (`jax.ShapeDtypeStruct`) stays
  abstract."""
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
  return jnp.asarray(x, dtype)


class Step(NamedTuple):
  logits_BlV: jax.Array  # Guided, divided by tau.
  cache: tuple  # (k, v), each (depth, rows, all scales so far, H, c).
  blocks: jax.Array  # Each block's output (depth, rows, l, C), unmixed.


def step(model: Infinity, cond: Condition, x_bsLC, cache, rope, si: int,
         cfg: float, tau: float, insertion: int, batch: int,
         unroll: bool = False) -> Step:
  """One scale. `x_bsLC` holds the scale's input tokens for every row
  (conditional rows, then the null rows when guided); `cache` the stacked
  (k, v) of the earlier scales or None; `rope` the scale's (cos, sin).

  The blocks run as a `lax.scan` (one compiled block, however deep the
  model; `unroll`: every block written out, which the compiler's cost
  analysis counts in full), split in two where guidance mixes the hidden
  states."""
  depth = model.cfg.depth
  guided = x_bsLC.shape[0] > batch and cfg != 1.0
  x = x_bsLC + model.lvl_embed[...][si]
  params = model.block_params()
  mix_after = depth + insertion if guided and insertion < 0 else None

  def body(x_BLC, inputs):
    p, kv_cache = inputs
    x_BLC, kv = model.block(p, x_BLC, cond, rope[0], rope[1], 0.0, kv_cache)
    return x_BLC, (x_BLC, kv)

  cut = depth if mix_after is None else mix_after + 1
  blocks, kvs = [], []
  for lo, hi in ((0, cut), (cut, depth)):
    if lo == hi:
      continue
    part = lambda a, lo=lo, hi=hi: a[lo:hi]
    x, (out, kv) = jax.lax.scan(
        body, x, (jax.tree.map(part, params),
                  None if cache is None else jax.tree.map(part, cache)),
        unroll=unroll)
    blocks.append(out)
    kvs.append(kv)
    if hi - 1 == mix_after:
      x = jnp.concatenate([mix(x, cfg, batch)] * 2)
  kv = tuple(jnp.concatenate([k[i] for k in kvs]) for i in range(2))
  new_cache = kv if cache is None else tuple(
      jnp.concatenate([c, n], 2) for c, n in zip(cache, kv))
  if guided and insertion == 0:
    logits = mix(model.logits(x, cond) / tau, cfg, batch)
  else:
    head_cond = Condition(*(a[:batch] for a in cond))
    logits = model.logits(x[:batch], head_cond) / tau
  return Step(logits, new_cache, jnp.concatenate(blocks))


class Sample(NamedTuple):
  bits: list  # Per scale (B, h * w, d) int32, as the transformer drew them.
  summed_BHWC: jax.Array  # The decoder's input (the tokenizer's grid).
  images_BHWC: jax.Array  # In [0, 1].


class InfinitySampler:
  """Draws images for prompts (T5 states) with an Infinity model and its
  tokenizer; one jitted program per (batch, text length, schedule).

  The weights are arguments of that program, not constants folded into
  it, so a 2B or 8B model compiles as fast as a tiny one and
  `device_put` can replicate them over a mesh. `unroll_blocks` writes every
  block out instead of scanning one (for the compiler's FLOP count).
  """

  def __init__(self, model: Infinity, vae: bsq.BSQVAE,
               options: InfinityOptions = InfinityOptions(), *,
               unroll_blocks: bool = False):
    bits = vae.cfg.codebook_dim * (4 if vae.cfg.spatial_patchify else 1)
    if bits != model.cfg.codebook_dim:
      raise UserError(f"the tokenizer gives {bits} bits per token, the "
                      f"transformer {model.cfg.codebook_dim}")
    if options.dtype not in SAMPLING_DTYPES:
      raise UserError(f"dtype must be one of "
                      f"{', '.join(SAMPLING_DTYPES)}, got {options.dtype!r}")
    self.cfg, self.vae_cfg, self.options = model.cfg, vae.cfg, options
    self.unroll_blocks = unroll_blocks
    self._graph, self.state = nnx.split((model, vae))
    if options.dtype != "float32":
      pure = nnx.to_pure_dict(self.state)
      for name in _MATRICES:
        pure[0][name] = cast(pure[0][name], options.dtype)
      nnx.replace_by_pure_dict(self.state, pure)
    self._jit = jax.jit(self._run, static_argnames=("cfg", "tau", "grids",
                                                     "ratio"))

  def lower(self, batch: int, text_len: int, *, grids, ratio: float = 1.0,
            sharding=None, batch_sharding=None, resident=None):
    """AOT-lowers the program for `batch` prompts of `text_len` tokens and
    the schedule `grids`. With `sharding` (of the weights) and
    `batch_sharding` (of the prompts), every argument is abstract and
    carries them: lowered for those devices (also compile-only ones)
    without touching the weights. `resident`: arrays that stay on the
    devices meanwhile (the text encoder's weights), passed as an unused
    argument so that the compiler's memory figures hold them."""
    grids = tuple(grids)
    cfg, tau = self.options.per_scale(len(grids), self.cfg.depth)

    def spec(shape, dtype, sh=None):
      return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    def placed(tree):
      return tree if sharding is None else jax.tree.map(
          lambda x: spec(x.shape, x.dtype, sharding), tree)

    key = jax.eval_shape(lambda: jax.random.key(0))
    program, extra = self._jit, ()
    if resident is not None:
      program = jax.jit(lambda _, *a, **k: self._run(*a, **k),
                        static_argnames=("cfg", "tau", "grids", "ratio"),
                        keep_unused=True)
      extra = (resident,)
    return program.lower(
        *extra, placed(self.state),
        spec((batch, text_len, self.cfg.text_channels), jnp.float32,
             batch_sharding),
        spec((batch, text_len), jnp.int32, batch_sharding), None,
        spec(key.shape, key.dtype, sharding), spec((batch,), jnp.int32,
                                                   batch_sharding),
        cfg=cfg, tau=tau, grids=grids, ratio=ratio)

  def device_put(self, sharding) -> None:
    """Moves every weight to `sharding` (e.g. replicated over a mesh)."""
    self.state = jax.device_put(self.state, sharding)

  def __call__(self, text_BTc, mask_BT, *, seed: int = 0, grids=None,
               ratio: float = 1.0, null_text_BTc=None, null_mask_BT=None,
               sample_ids=None):
    """`grids`: a schedule (default 256px 1:1); `null_text_BTc` and
    `null_mask_BT`: a negative prompt's states (as long as the prompts')
    instead of the learned null text; `sample_ids`: each row's index in the
    whole job (default 0..B-1), which its keys are folded with. Arrays may
    already be placed (e.g. sharded over a batch axis)."""
    grids = tuple(grids or schedules.schedule(ratio, 256))
    cfg, tau = self.options.per_scale(len(grids), self.cfg.depth)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
      raise UserError(f"seed must be an integer >= 0, got {seed!r}")
    b = np.shape(text_BTc)[0]
    ids = np.arange(b, dtype=np.int32) if sample_ids is None else sample_ids
    null = None if null_text_BTc is None else (
        jnp.asarray(null_text_BTc, jnp.float32),
        jnp.asarray(mask_BT if null_mask_BT is None else null_mask_BT))
    return self._jit(self.state, jnp.asarray(text_BTc, jnp.float32),
                     jnp.asarray(mask_BT), null, jax.random.key(seed),
                     jnp.asarray(ids, jnp.int32), cfg=cfg, tau=tau,
                     grids=grids, ratio=ratio)

  def _run(self, state, text, mask, null_text, key, ids, cfg, tau, *, grids,
           ratio):
    model, vae = nnx.merge(self._graph, state)
    opts = self.options
    b, d = text.shape[0], model.cfg.codebook_dim
    # A patchifying tokenizer works on grids twice as fine, with a quarter
    # of the channels: each token is a 2x2 group of its positions.
    patch = vae.cfg.spatial_patchify
    to_vae = bsq.unpatchify if patch else (lambda x: x)
    from_vae = bsq.patchify if patch else (lambda x: x)
    vae_grids = [(2 * h, 2 * w) if patch else (h, w) for h, w in grids]
    guided = any(c != 1.0 for c in cfg)
    if guided:
      null, null_mask = ((model.null_text(mask), mask) if null_text is None
                         else null_text)
      cond = model.condition(jnp.concatenate([text, null]),
                             jnp.concatenate([mask, null_mask]))
    else:
      cond = model.condition(text, mask)
    table = schedules.rope_table(ratio, grids, model.cfg.head_dim)
    x = model.start_tokens(cond)
    cache, start = None, 0
    size = vae_grids[-1]
    summed = jnp.zeros((b, *size, vae.cfg.codebook_dim), jnp.float32)
    bits_out = []
    for si, (h, w) in enumerate(grids):
      rope = (jnp.asarray(table[0, start:start + h * w]),
              jnp.asarray(table[1, start:start + h * w]))
      logits, cache, _ = step(model, cond, x, cache, rope, si, cfg[si],
                              tau[si], opts.cfg_insertion_layer, b,
                              self.unroll_blocks)
      masked = filter_bits(logits, opts.top_k, opts.top_p)
      bits = draw_bits(masked, bit_noise(key, si, ids, h * w, d))
      bits_out.append(bits)
      codes = bsq.bits_to_codes(to_vae(bits.reshape(b, h, w, d)))
      summed = summed + interp.bilinear_resize(codes, size)
      if si + 1 < len(grids):
        nxt = interp.bilinear_resize(summed, vae_grids[si + 1])
        x = model.embed_scale(bsq.flatten(from_vae(nxt)))
        if guided:
          x = jnp.concatenate([x, x])
      start += h * w
    images = (vae.decode(summed) + 1) / 2
    return Sample(bits_out, summed, images)
