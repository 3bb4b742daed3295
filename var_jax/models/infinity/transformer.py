"""Infinity's transformer: text-conditioned AdaLN blocks over bitwise maps.

Text (the T5 encoder's states, padded, with a mask) is RMS-normalised, then
pooled by attention into one vector per prompt (the start token and the
AdaLN condition) and projected by an MLP into the keys and values of every
block's cross-attention. Each block: self-attention with L2-normalised
queries and keys (a learned per-head temperature) and a 2-D rotary
embedding, cross-attention over the prompt's own tokens, and a GELU MLP;
the AdaLN gains, scales and shifts are a per-block table plus one shared
projection of the condition. The head gives two logits per bit.

The reference runs cross-attention (and the pool) through a bfloat16
kernel even in float32: queries, keys, values and the output are rounded to
bfloat16 there, and so they are here.

Blocks are stacked (a leading `depth` axis) and run as one `lax.scan`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.models.infinity import schedules
from var_jax.models.infinity.config import InfinityConfig
from var_jax.models.layers import (l2_normalize, layer_norm, param,
                                    rms_norm)

FSDP = "fsdp"
_MAX_LOG_SCALE = math.log(100.0)


def _bf16(x):
  return x.astype(jnp.bfloat16).astype(jnp.float32)


def _mm(x, w):
  """x @ w in the weight's dtype (bfloat16 weights: bfloat16 inputs), summed
  in float32; a float32 result."""
  return jnp.matmul(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def rotate(x_BLHc, cos_Lk, sin_Lk):
  """2-D rotary embedding on adjacent channel pairs (2p, 2p + 1), pair p
  turned by angle column p."""
  b, l, h, c = x_BLHc.shape
  x = x_BLHc.astype(jnp.float32).reshape(b, l, h, c // 2, 2)
  cos, sin = cos_Lk[None, :, None], sin_Lk[None, :, None]
  x0, x1 = x[..., 0], x[..., 1]
  return jnp.stack([cos * x0 - sin * x1, sin * x0 + cos * x1],
                   -1).reshape(b, l, h, c)


# Queries per attention call: a 1024px scale's 4,096 queries against its
# 10,521 keys would otherwise hold 2.7 GB of float32 scores per row pair.
QUERY_CHUNK = 1024


def masked_attention(q_BQHc, k_BKHc, v_BKHc, bias_BHQK, scale):
  """Softmax attention in the keys' dtype, summed and normalised in
  float32; queries in chunks of `QUERY_CHUNK` (each row's softmax is its
  own, so the result is the same)."""
  n = q_BQHc.shape[1]
  if n <= QUERY_CHUNK:
    return _attention(q_BQHc, k_BKHc, v_BKHc, bias_BHQK, scale)
  bias = jnp.asarray(bias_BHQK)
  per_query = bias.ndim >= 2 and bias.shape[-2] > 1
  return jnp.concatenate([_attention(
      q_BQHc[:, lo:lo + QUERY_CHUNK], k_BKHc, v_BKHc,
      bias[..., lo:lo + QUERY_CHUNK, :] if per_query else bias, scale)
      for lo in range(0, n, QUERY_CHUNK)], 1)


def _attention(q_BQHc, k_BKHc, v_BKHc, bias_BHQK, scale):
  s = jnp.einsum("bqhc,bkhc->bhqk", q_BQHc.astype(k_BKHc.dtype), k_BKHc,
                 preferred_element_type=jnp.float32) * scale + bias_BHQK
  p = jax.nn.softmax(s, -1).astype(v_BKHc.dtype)
  return jnp.einsum("bhqk,bkhc->bqhc", p, v_BKHc,
                    preferred_element_type=jnp.float32)


class Condition(NamedTuple):
  """What the text gives every scale: the pooled vector (start token and
  AdaLN input), the cross-attention keys/values source and their mask, and
  the shared AdaLN table."""

  cond_BC: jax.Array
  ca_kv_BTC: jax.Array
  text_mask_BT: jax.Array
  gss_B6C: jax.Array


_BLOCK_PARAMS = ("ada_gss", "qkv", "q_bias", "v_bias", "scale_mul", "proj",
                 "proj_b", "ca_norm_w", "ca_norm_b", "ca_q", "ca_q_b",
                 "ca_kv", "ca_v_bias", "ca_proj", "ca_proj_b", "fc1",
                 "fc1_b", "fc2", "fc2_b")


class Infinity(nnx.Module):
  """Teacher-forced logits (`__call__`) and the pieces a sampler steps."""

  def __init__(self, cfg: InfinityConfig, *, rngs: nnx.Rngs | None = None):
    cfg.validate()
    self.cfg = cfg
    rngs = rngs or nnx.Rngs(0)
    n, c, t = cfg.depth, cfg.embed_dim, cfg.text_channels
    f, h, hp = cfg.mlp_dim, cfg.num_heads, cfg.pool_heads

    def w(shape, fan_in, sharding):
      return param(jax.random.normal(rngs.params(), shape, jnp.float32)
                    / math.sqrt(fan_in), sharding)

    def zeros(shape, sharding):
      return param(jnp.zeros(shape, jnp.float32), sharding)

    self.cfg_uncond = w((cfg.text_maxlen, t), t, (None, None))
    self.text_norm = param(jnp.ones((t,)), (None,))
    self.pool_q = w((hp, c // hp), c // hp, (None, None))
    self.pool_kv = w((t, 2 * c), t, (FSDP, None))
    self.pool_v_bias = zeros((c,), (None,))
    self.pool_proj = w((c, c), c, (FSDP, None))
    self.pool_proj_b = zeros((c,), (None,))
    self.text_ca1 = w((t, c), t, (FSDP, None))
    self.text_ca1_b = zeros((c,), (None,))
    self.text_ca2 = w((c, c), c, (FSDP, None))
    self.text_ca2_b = zeros((c,), (None,))
    self.pos_start = w((c,), 1, (None,))
    self.lvl_embed = w((cfg.num_levels, c), 1, (None, None))
    self.word_embed = w((cfg.codebook_dim, c), cfg.codebook_dim, (None, None))
    self.word_embed_b = zeros((c,), (None,))
    self.shared_ada = w((c, 6 * c), c, (FSDP, None))
    self.shared_ada_b = zeros((6 * c,), (None,))
    # Blocks, stacked.
    self.ada_gss = zeros((n, 6, c), (None, None, None))
    self.qkv = w((n, c, 3 * c), c, (None, FSDP, None))
    self.q_bias = zeros((n, c), (None, None))
    self.v_bias = zeros((n, c), (None, None))
    self.scale_mul = param(jnp.full((n, h), math.log(4.0)), (None, None))
    self.proj = w((n, c, c), c, (None, FSDP, None))
    self.proj_b = zeros((n, c), (None, None))
    self.ca_norm_w = param(jnp.ones((n, c)), (None, None))
    self.ca_norm_b = zeros((n, c), (None, None))
    self.ca_q = w((n, c, c), c, (None, FSDP, None))
    self.ca_q_b = zeros((n, c), (None, None))
    self.ca_kv = w((n, c, 2 * c), c, (None, FSDP, None))
    self.ca_v_bias = zeros((n, c), (None, None))
    self.ca_proj = w((n, c, c), c, (None, FSDP, None))
    self.ca_proj_b = zeros((n, c), (None, None))
    self.fc1 = w((n, c, f), c, (None, FSDP, None))
    self.fc1_b = zeros((n, f), (None, None))
    self.fc2 = w((n, f, c), f, (None, FSDP, None))
    self.fc2_b = zeros((n, c), (None, None))
    self.head_ada = w((c, 2 * c), c, (FSDP, None))
    self.head_ada_b = zeros((2 * c,), (None,))
    self.head = w((c, cfg.logits_per_token), c, (FSDP, None))
    self.head_b = zeros((cfg.logits_per_token,), (None,))

  # ---------------------------------------------------------------- text
  def null_text(self, mask_BT: jax.Array) -> jax.Array:
    """The learned "no prompt" text, as long as each prompt (its first
    rows), for classifier-free guidance."""
    t = mask_BT.shape[1]
    return jnp.broadcast_to(self.cfg_uncond[...][:t],
                            (mask_BT.shape[0], t, self.cfg.text_channels))

  def condition(self, text_BTc: jax.Array, mask_BT: jax.Array) -> Condition:
    """T5 states (padded; `mask_BT` 1 on real tokens) -> the `Condition`."""
    cfg = self.cfg
    b, t, _ = text_BTc.shape
    c, hp = cfg.embed_dim, cfg.pool_heads
    cp = c // hp
    mask = jnp.asarray(mask_BT, bool)
    x = rms_norm(text_BTc, self.text_norm[...], cfg.norm_eps)
    kv = x @ self.pool_kv[...] + jnp.concatenate(
        [jnp.zeros((c,)), self.pool_v_bias[...]])
    kv = _bf16(kv.reshape(b, t, 2, hp, cp))
    q = _bf16(jnp.broadcast_to(self.pool_q[...], (b, 1, hp, cp)))
    bias = jnp.where(mask, 0.0, -jnp.inf)[:, None, None, :]
    pooled = _bf16(masked_attention(q, kv[:, :, 0], kv[:, :, 1], bias,
                                    1 / math.sqrt(cp)))
    cond = pooled.reshape(b, c) @ self.pool_proj[...] + self.pool_proj_b[...]
    ca = jax.nn.gelu(x @ self.text_ca1[...] + self.text_ca1_b[...],
                     approximate=True)
    ca = ca @ self.text_ca2[...] + self.text_ca2_b[...]
    gss = (jax.nn.silu(cond) @ self.shared_ada[...]
           + self.shared_ada_b[...]).reshape(b, 6, c)
    return Condition(cond, ca, mask, gss)

  # -------------------------------------------------------------- tokens
  def embed_scale(self, x_BLd: jax.Array) -> jax.Array:
    """A scale's code inputs (B, l, d) -> token states (B, l, C)."""
    return x_BLd @ self.word_embed[...] + self.word_embed_b[...]

  def start_tokens(self, cond: Condition) -> jax.Array:
    """(B, 1, C): the pooled text plus the learned start position."""
    return (cond.cond_BC + self.pos_start[...])[:, None]

  def block_params(self) -> dict:
    return {k: getattr(self, k)[...] for k in _BLOCK_PARAMS}

  def block(self, p: dict, x_BLC, cond: Condition, rope_cos_Lk, rope_sin_Lk,
            bias_BHLK, cache_kv=None):
    """One block over `x_BLC`; keys/values `cache_kv` (each (B, S, H, c),
    already rotated) of earlier scales come before this scale's. Returns
    (x_BLC, (k, v) of this call's tokens)."""
    cfg = self.cfg
    b, l, c = x_BLC.shape
    h, hc, eps = cfg.num_heads, cfg.head_dim, cfg.norm_eps
    g1, g2, s1, s2, sh1, sh2 = jnp.split(p["ada_gss"] + cond.gss_B6C, 6, 1)
    y = layer_norm(x_BLC, eps) * (1 + s1) + sh1
    qkv = _mm(y, p["qkv"]) + jnp.concatenate(
        [p["q_bias"], jnp.zeros_like(p["q_bias"]), p["v_bias"]])
    q, k, v = jnp.split(qkv.reshape(b, l, 3, h, hc), 3, 2)
    temp = jnp.exp(jnp.minimum(p["scale_mul"], _MAX_LOG_SCALE))
    q = rotate(l2_normalize(q[:, :, 0]) * temp[:, None], rope_cos_Lk, rope_sin_Lk)
    k = rotate(l2_normalize(k[:, :, 0]), rope_cos_Lk, rope_sin_Lk)
    v = v[:, :, 0]
    # The cache holds keys and values in the weights' dtype.
    k, v = k.astype(p["qkv"].dtype), v.astype(p["qkv"].dtype)
    new_kv = (k, v)
    if cache_kv is not None:
      k = jnp.concatenate([cache_kv[0], k], 1)
      v = jnp.concatenate([cache_kv[1], v], 1)
    a = masked_attention(q, k, v, bias_BHLK, 1.0).reshape(b, l, c)
    x_BLC = x_BLC + (_mm(a, p["proj"]) + p["proj_b"]) * g1
    o = self.cross_attention(p, x_BLC, cond)
    x_BLC = x_BLC + _mm(o, p["ca_proj"]) + p["ca_proj_b"]
    y = layer_norm(x_BLC, eps) * (1 + s2) + sh2
    y = jax.nn.gelu(_mm(y, p["fc1"]) + p["fc1_b"], approximate=True)
    return x_BLC + (_mm(y, p["fc2"]) + p["fc2_b"]) * g2, new_kv

  def cross_attention(self, p: dict, x_BLC, cond: Condition, *,
                      round_output: bool = True) -> jax.Array:
    """A block's attention over the prompt's tokens, before its output
    projection: (B, L, C). Queries, keys and values are rounded to
    bfloat16, and the output too (`round_output`), as the reference's
    kernel computes it."""
    cfg = self.cfg
    b, l, c = x_BLC.shape
    h, hc = cfg.num_heads, cfg.head_dim
    y = layer_norm(x_BLC, cfg.norm_eps, p["ca_norm_w"], p["ca_norm_b"])
    q = _bf16((_mm(y, p["ca_q"]) + p["ca_q_b"]).reshape(b, l, h, hc))
    kv = _mm(cond.ca_kv_BTC, p["ca_kv"]) + jnp.concatenate(
        [jnp.zeros_like(p["ca_v_bias"]), p["ca_v_bias"]])
    kv = _bf16(kv.reshape(b, -1, 2, h, hc))
    bias = jnp.where(cond.text_mask_BT, 0.0, -jnp.inf)[:, None, None, :]
    o = masked_attention(q, kv[:, :, 0], kv[:, :, 1], bias, 1 / math.sqrt(hc))
    return (_bf16(o) if round_output else o).reshape(b, l, c)

  def logits(self, x_BLC, cond: Condition) -> jax.Array:
    """(B, L, 2d): per bit j, logits of class 0 and 1 at 2j and 2j + 1."""
    c = self.cfg.embed_dim
    ss = (jax.nn.silu(cond.cond_BC) @ self.head_ada[...]
          + self.head_ada_b[...]).reshape(-1, 2, c)
    y = layer_norm(x_BLC, self.cfg.norm_eps) * (1 + ss[:, :1]) + ss[:, 1:]
    return y @ self.head[...] + self.head_b[...]

  # ------------------------------------------------------ teacher forcing
  def teacher_forcing_layout(self, grids, ratio: float = 1.0):
    """(cos_Lk, sin_Lk, bias_11LL) of the whole sequence of `grids`: the
    rotary angles and the block-causal mask (a token sees its own and every
    coarser scale)."""
    table = schedules.rope_table(ratio, grids, self.cfg.head_dim)
    lvl = schedules.level_ids(grids)
    bias = np.where(lvl[:, None] >= lvl[None, :], 0.0, -np.inf)
    return (jnp.asarray(table[0]), jnp.asarray(table[1]),
            jnp.asarray(bias.astype(np.float32))[None, None])

  def __call__(self, text_BTc, mask_BT, x_BLd, grids, ratio: float = 1.0,
               *, return_blocks: bool = False):
    """Logits (B, L, 2d) of every scale of `grids` from the inputs of
    scales 1.. (`x_BLd`, (B, L - 1, d)); scale 0 is the start token. With
    `return_blocks`, also each block's output (depth, B, L, C)."""
    cond = self.condition(text_BTc, mask_BT)
    x = jnp.concatenate([self.start_tokens(cond), self.embed_scale(x_BLd)],
                        1)
    x = x + self.lvl_embed[...][schedules.level_ids(grids)]  # Block 0 only.
    cos, sin, bias = self.teacher_forcing_layout(grids, ratio)

    def step(x_BLC, p):
      x_BLC, _ = self.block(p, x_BLC, cond, cos, sin, bias)
      return x_BLC, x_BLC if return_blocks else None

    x, blocks = jax.lax.scan(step, x, self.block_params())
    out = self.logits(x, cond)
    return (out, blocks) if return_blocks else out
