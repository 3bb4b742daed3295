"""The VAR transformer: AdaLN GPT-2 blocks over the multi-scale token pyramid.

Block parameters are stacked along a leading `depth` axis and applied with one
`lax.scan`, which keeps compile time flat in depth. Every parameter declares
its sharding (`out_sharding`, mesh axis names) right where it is created.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from var_jax.models.var.config import VARConfig
from var_jax.models import attention, scales

FSDP = "fsdp"


def _normal(key, shape, std):
  return std * jax.random.normal(key, shape, jnp.float32)


def _param(value, sharding):
  # The sharding names are metadata: the trainer places the state through
  # jit(out_shardings=...), so nothing is sharded eagerly at construction
  # (and Flax's global flax_always_shard_variable is left as it is).
  return nnx.Param(value, out_sharding=sharding, eager_sharding=False)


def layer_norm(x, eps):
  """LayerNorm without affine parameters, computed in float32."""
  x = x.astype(jnp.float32)
  mu = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps)


def _l2norm(x, eps=1e-12):
  n = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(n, eps)


def _mm(x, w, dtype):
  """Matmul in the compute dtype with float32 accumulation and result."""
  return jnp.matmul(x.astype(dtype), w.astype(dtype),
                    preferred_element_type=jnp.float32)


class Linear(nnx.Module):
  """y = x W + b with W stored (in, out); shards the input axis over fsdp."""

  def __init__(self, din, dout, *, key, std, sharding=(FSDP, None)):
    self.kernel = _param(_normal(key, (din, dout), std), sharding)
    self.bias = _param(jnp.zeros((dout,), jnp.float32), (None,))

  def __call__(self, x, dtype=jnp.float32):
    return _mm(x, self.kernel[...], dtype) + self.bias[...]


class Embed(nnx.Module):

  def __init__(self, n, d, *, key, std):
    self.embedding = _param(_normal(key, (n, d), std), (None, FSDP))

  def __call__(self, idx):
    return jnp.take(self.embedding[...], idx, axis=0)


class KVCache(NamedTuple):
  """Keys and values of every layer for all L positions: (depth, B, H, L, c).

  Head-major, so each (row, head) attention reads contiguous keys.
  """
  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, cfg: VARConfig, batch: int, dtype=jnp.float32):
    shape = (cfg.depth, batch, cfg.num_heads, cfg.seq_len, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class Blocks(nnx.Module):
  """`depth` AdaLN self-attention blocks, parameters stacked on axis 0."""

  def __init__(self, cfg: VARConfig, *, key):
    d, c, f, h = cfg.depth, cfg.embed_dim, cfg.mlp_dim, cfg.num_heads
    self.cfg = cfg
    std = math.sqrt(1 / c / 3)
    ks = jax.random.split(key, 6)
    out_div = math.sqrt(2 * d)
    self.mat_qkv = _param(_normal(ks[0], (d, c, 3 * c), std), (None, FSDP, None))
    self.q_bias = _param(jnp.zeros((d, c)), (None, None))
    self.v_bias = _param(jnp.zeros((d, c)), (None, None))
    self.scale_mul = _param(jnp.full((d, h), math.log(4.0)), (None, None))
    self.proj_w = _param(_normal(ks[1], (d, c, c), std / out_div),
                         (None, None, FSDP))
    self.proj_b = _param(jnp.zeros((d, c)), (None, None))
    self.fc1_w = _param(_normal(ks[2], (d, c, f), std), (None, FSDP, None))
    self.fc1_b = _param(jnp.zeros((d, f)), (None, None))
    self.fc2_w = _param(_normal(ks[3], (d, f, c), std / out_div),
                        (None, None, FSDP))
    self.fc2_b = _param(jnp.zeros((d, c)), (None, None))
    # AdaLN gains: gamma (first 2C outputs) start near 0, scale/shift at 0.5x.
    gain = jnp.concatenate([jnp.full((2 * c,), 1e-5), jnp.full((4 * c,), 0.5)])
    if cfg.shared_aln:
      gss = jax.random.normal(ks[4], (d, 6, c)) / math.sqrt(c)
      self.ada_gss = _param(gss * gain.reshape(6, c), (None, None, FSDP))
    else:
      self.ada_w = _param(_normal(ks[4], (d, c, 6 * c), std) * gain,
                          (None, FSDP, None))
      self.ada_b = _param(jnp.zeros((d, 6 * c)), (None, None))

  def stacked(self) -> dict[str, jax.Array]:
    """The per-layer parameter arrays, each with leading axis `depth`."""
    names = ["mat_qkv", "q_bias", "v_bias", "scale_mul", "proj_w", "proj_b",
             "fc1_w", "fc1_b", "fc2_w", "fc2_b"]
    names += ["ada_gss"] if self.cfg.shared_aln else ["ada_w", "ada_b"]
    return {n: getattr(self, n)[...] for n in names}


def _adaln(cfg, p, cond):
  """(B, 6, C) modulation: gamma1, gamma2, scale1, scale2, shift1, shift2."""
  c = cfg.embed_dim
  if cfg.shared_aln:
    return cond + p["ada_gss"][None]  # cond: (B, 6, C) from the shared linear.
  return (_mm(nnx.silu(cond), p["ada_w"], jnp.float32) + p["ada_b"]).reshape(
      -1, 6, c)


def _qkv(cfg, p, x_BLC, dtype):
  b, l, c = x_BLC.shape
  bias = jnp.concatenate([p["q_bias"], jnp.zeros_like(p["q_bias"]),
                          p["v_bias"]])
  qkv = (_mm(x_BLC, p["mat_qkv"], dtype) + bias).reshape(
      b, l, 3, cfg.num_heads, cfg.head_dim)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, L, H, c)
  if cfg.attn_l2_norm:
    mul = jnp.exp(jnp.minimum(p["scale_mul"], math.log(100.0)))
    q = _l2norm(q) * mul[None, None, :, None]
    k = _l2norm(k)
  return q, k, v


def _scale(cfg) -> float:
  """Score multiplier (with L2-normalised q/k the learned scale is in q)."""
  return 1.0 if cfg.attn_l2_norm else 0.25 / math.sqrt(cfg.head_dim)


def _attend_block_causal(cfg, q_BLHc, k_BLHc, v_BLHc, dtype):
  """Teacher-forcing attention over the whole pyramid -> (B, L, H * c)."""
  b, l, h, c = q_BLHc.shape
  heads = lambda a: _heads_first(a).reshape(b * h, l, c)
  o = attention.block_causal_attention(
      tuple(cfg.patch_nums), _scale(cfg), dtype, heads(q_BLHc),
      heads(k_BLHc), heads(v_BLHc))
  return _heads_first(o.reshape(b, h, l, c)).reshape(b, l, h * c)


def _heads_first(a):
  """(B, l, H, c) <-> (B, H, l, c)."""
  return jnp.transpose(a, (0, 2, 1, 3))


def _attend_heads(cfg, q_BlHc, k_BHSc, v_BHSc, bias_lS, dtype):
  """Cached-decoding attention: head-major keys/values -> (B, l, H * c)."""
  b, l, h, c = q_BlHc.shape
  s = k_BHSc.shape[2]
  o = attention.grouped_attention(
      _heads_first(q_BlHc).reshape(b * h, l, c), k_BHSc.reshape(b * h, s, c),
      v_BHSc.reshape(b * h, s, c), bias_lS, _scale(cfg), dtype)
  return _heads_first(o.reshape(b, h, l, c)).reshape(b, l, h * c)


def _block(cfg, p, x_BLC, ada_B6C, attn_fn, dtype, keep_B=None):
  """One AdaLN block; `attn_fn(q, k, v)` supplies masking or the KV cache."""
  g1, g2, s1, s2, b1, b2 = [ada_B6C[:, i:i + 1, :] for i in range(6)]
  h = layer_norm(x_BLC, cfg.norm_eps) * (s1 + 1) + b1
  q, k, v = _qkv(cfg, p, h, dtype)
  o, extra = attn_fn(q, k, v)
  a = (_mm(o, p["proj_w"], dtype) + p["proj_b"]) * g1
  x_BLC = x_BLC + (a if keep_B is None else a * keep_B)
  m = _mlp(cfg, p, x_BLC, s2, b2, dtype) * g2
  x_BLC = x_BLC + (m if keep_B is None else m * keep_B)
  return x_BLC, extra


@functools.partial(jax.checkpoint, static_argnums=(0, 5), prevent_cse=False,
                   policy=jax.checkpoint_policies.dots_saveable)
def _mlp(cfg, p, x_BLC, scale, shift, dtype):
  """AdaLN-modulated LayerNorm, fc1, GELU, fc2.

  Under differentiation only the matmul outputs are kept for the backward
  pass; the norm and the GELU are recomputed there. Autodiff would otherwise
  keep several (B, L, 4C) intermediates of the tanh GELU per layer.
  prevent_cse is off: training differentiates it only inside the scan over
  layers, where CSE cannot undo the recomputation, and its barriers would
  block fusion in the (undifferentiated) sampler.
  """
  h = layer_norm(x_BLC, cfg.norm_eps) * (scale + 1) + shift
  h = jax.nn.gelu(_mm(h, p["fc1_w"], dtype) + p["fc1_b"], approximate=True)
  return _mm(h, p["fc2_w"], dtype) + p["fc2_b"]


class VAR(nnx.Module):
  """Class-conditional next-scale predictor."""

  def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    c, key = cfg.embed_dim, rngs.params()
    ks = jax.random.split(key, 9)
    std = math.sqrt(1 / c / 3)
    self.word_embed = Linear(cfg.cvae, c, key=ks[0], std=std,
                             sharding=(None, FSDP))
    self.class_emb = Embed(cfg.num_classes + 1, c, key=ks[1], std=std)
    self.pos_start = _param(_normal(ks[2], (1, cfg.first_l, c), std),
                            (None, None, FSDP))
    self.pos_1LC = _param(_normal(ks[3], (1, cfg.seq_len, c), std),
                          (None, None, FSDP))
    self.lvl_embed = Embed(len(cfg.patch_nums), c, key=ks[4], std=std)
    self.shared_ada_lin = (Linear(c, 6 * c, key=ks[5], std=std)
                           if cfg.shared_aln else None)
    self.blocks = Blocks(cfg, key=ks[6])
    self.head_nm = Linear(c, 2 * c, key=ks[7], std=std * 0.5)
    self.head = Linear(c, cfg.vocab_size, key=ks[8], std=std * 0.02)

  # ------------------------------------------------------------ embeddings
  def lvl_pos(self) -> jax.Array:
    """(1, L, C): level embedding + absolute position, added to every input."""
    lvl = jnp.asarray(scales.layout(self.cfg.patch_nums).level_ids())
    return self.lvl_embed(lvl)[None] + self.pos_1LC[...]

  def block_cond(self, cond_BD):
    """What the blocks are conditioned on: the class vector or shared gains."""
    if self.shared_ada_lin is None:
      return cond_BD
    g = self.shared_ada_lin(nnx.silu(cond_BD))
    return g.reshape(cond_BD.shape[0], 6, self.cfg.embed_dim)

  def sos(self, cond_BD) -> jax.Array:
    """First-scale input tokens (B, first_l, C), level/position included."""
    first = self.cfg.first_l
    return cond_BD[:, None, :] + self.pos_start[...] + self.lvl_pos()[:, :first]

  def logits(self, h_BLC, cond_BD) -> jax.Array:
    """AdaLN before the head, then the vocabulary projection, in float32."""
    c = self.cfg.embed_dim
    ss = self.head_nm(nnx.silu(cond_BD)).reshape(-1, 1, 2, c)
    h = layer_norm(h_BLC, self.cfg.norm_eps) * (ss[:, :, 0] + 1) + ss[:, :, 1]
    return self.head(h)

  # ------------------------------------------------------------ teacher forcing
  def __call__(self, labels_B, x_BLCvae, *, dropout_key=None,
               dtype=jnp.float32) -> jax.Array:
    """Teacher-forced logits (B, L, V).

    Args:
      labels_B: class ids; `num_classes` is the null (unconditional) class.
      x_BLCvae: `idx_to_var_input` of the ground truth, (B, L - first_l, Cvae).
      dropout_key: enables training-time class dropout and drop-path.
      dtype: matmul compute dtype (params and residual stream stay float32).
    """
    cfg = self.cfg
    b = labels_B.shape[0]
    if dropout_key is not None:
      k_cls, k_path = jax.random.split(dropout_key)
      drop = jax.random.uniform(k_cls, (b,)) < cfg.cond_drop_rate
      labels_B = jnp.where(drop, cfg.num_classes, labels_B)
    cond_BD = self.class_emb(labels_B)
    x = jnp.concatenate([
        jnp.broadcast_to(cond_BD[:, None] + self.pos_start[...],
                         (b, cfg.first_l, cfg.embed_dim)),
        self.word_embed(x_BLCvae.astype(jnp.float32)),
    ], axis=1) + self.lvl_pos()

    def attn(q, k, v):
      return _attend_block_causal(cfg, q, k, v, dtype), None

    keep = None
    if dropout_key is not None and cfg.drop_path_rate > 0:
      rates = jnp.linspace(0.0, cfg.drop_path_rate, cfg.depth)
      keys = jax.random.split(k_path, cfg.depth)
      keep = jax.vmap(lambda k_, r: jax.random.bernoulli(
          k_, 1 - r, (b, 1, 1)).astype(jnp.float32) / (1 - r))(keys, rates)

    x = self._run_blocks(x, self.block_cond(cond_BD), attn, dtype, keep)
    return self.logits(x, cond_BD)

  def _run_blocks(self, x, cond, attn, dtype, keep=None):
    cfg = self.cfg

    def body(x, xs):
      p, keep_B = xs
      x, _ = _block(cfg, p, x, _adaln(cfg, p, cond), attn, dtype, keep_B)
      return x, None

    x, _ = jax.lax.scan(body, x, (self.blocks.stacked(), keep))
    return x

  # ------------------------------------------------------------ cached decoding
  def adaln_all(self, cond_BD, layers=None) -> jax.Array:
    """(depth, B, 6, C) AdaLN modulation of every block.

    It depends only on the class, so cached decoding computes it once per
    sample instead of once per scale (which would re-read depth * 6C^2
    weights each time) and passes it to `decode`. `layers`: as in `decode`.
    """
    cond = self.block_cond(cond_BD)
    if layers is not None:
      return jnp.stack([_adaln(self.cfg, p, cond) for p in layers])
    return jax.vmap(lambda p: _adaln(self.cfg, p, cond))(self.blocks.stacked())

  def decode(self, x_BlC, cond_BD, cache: KVCache, start, kv_len: int,
             dtype=jnp.float32, key_limit=None, ada=None, layers=None):
    """Runs all blocks on new tokens at positions [start, start + l).

    Keys/values of the new tokens are written into `cache`; queries attend to
    cache positions [0, kv_len) (static), of which only those below
    `key_limit` (default start + l) are valid: padded scans pass a larger
    static kv_len and a dynamic limit. `ada` is `adaln_all(cond_BD)` when
    the caller has it (computed here otherwise).

    `layers`, when given, is one dict of block parameters per layer, each
    array its own buffer (as the sampler keeps them for
    `layer_loop="unrolled"`); the blocks then run as a Python loop instead of
    a scan. On CPU a scan over the stacked parameters copies every layer's
    weights out of the stack before its matmuls, which doubles the memory
    traffic of the small, bandwidth-bound scales.

    Returns the final hidden states (B, l, C) and the updated cache.
    """
    cfg = self.cfg
    b, l, _ = x_BlC.shape
    h, c = cfg.num_heads, cfg.head_dim
    limit = start + l if key_limit is None else key_limit
    bias = jnp.where(jnp.arange(kv_len) < limit, 0.0, attention.NEG)[None, :]
    if ada is None:
      ada = self.adaln_all(cond_BD, layers)
    zero = jnp.zeros((), jnp.int32)
    start = jnp.asarray(start, jnp.int32)
    kv_shape = (1, b, h, kv_len, c)

    # The cache is a loop constant of the layer loop: each layer copies out
    # only its first kv_len positions, adds the new keys there and attends;
    # the new keys leave the loop as small outputs written back once. (Carrying
    # the whole cache made XLA copy all of it at every layer.)
    def body(x, xs):
      p, ada_B6C, i = xs

      def attn(q, k, v):
        first = (i, zero, zero, zero, zero)
        at = (zero, zero, start, zero)
        k_new, v_new = _heads_first(k), _heads_first(v)
        k_all = jax.lax.dynamic_update_slice(
            jax.lax.dynamic_slice(cache.k, first, kv_shape)[0],
            k_new.astype(cache.k.dtype), at)
        v_all = jax.lax.dynamic_update_slice(
            jax.lax.dynamic_slice(cache.v, first, kv_shape)[0],
            v_new.astype(cache.v.dtype), at)
        o = _attend_heads(cfg, q, k_all, v_all, bias, dtype)
        return o, (k_new, v_new)

      return _block(cfg, p, x, ada_B6C, attn, dtype)

    x, (k_new, v_new) = self._over_layers(
        body, x_BlC, ada, layers, jnp.arange(cfg.depth, dtype=jnp.int32))
    at = (zero, zero, zero, start, zero)
    return x, KVCache(
        jax.lax.dynamic_update_slice(cache.k, k_new.astype(cache.k.dtype), at),
        jax.lax.dynamic_update_slice(cache.v, v_new.astype(cache.v.dtype), at))

  def decode_chunks(self, x_BlC, cond_BD, chunks: tuple, dtype=jnp.float32,
                    ada=None, layers=None):
    """`decode` against a KV cache kept as one chunk per finished scale.

    For loops whose every scale has static shapes (the unrolled sampler):
    each layer attends to the concatenation of its slice of every chunk and
    the new keys, and the new keys of all layers come back as the next chunk
    (depth, B, H, l, c) in `dtype`. Nothing is written into a preallocated
    cache, which XLA on CPU copies whole at every scale rather than update
    in place.

    Returns the final hidden states (B, l, C) and the new chunk.
    """
    cfg = self.cfg
    if ada is None:
      ada = self.adaln_all(cond_BD, layers)

    def body(x, xs):
      p, ada_B6C, (old_k, old_v) = xs

      def attn(q, k, v):
        k_new = _heads_first(k).astype(dtype)
        v_new = _heads_first(v).astype(dtype)
        k_all = jnp.concatenate(old_k + (k_new,), axis=2)
        v_all = jnp.concatenate(old_v + (v_new,), axis=2)
        return _attend_heads(cfg, q, k_all, v_all, 0.0, dtype), (k_new, v_new)

      return _block(cfg, p, x, ada_B6C, attn, dtype)

    old = (tuple(ch.k for ch in chunks), tuple(ch.v for ch in chunks))
    x, (k_new, v_new) = self._over_layers(body, x_BlC, ada, layers, old)
    return x, KVCache(k_new, v_new)

  def _over_layers(self, body, x, ada, layers, extra):
    """Applies `body(x, (params, ada_i, extra_i)) -> (x, y)` to every block.

    `extra` is a pytree with a leading depth axis. Without `layers` this is a
    scan over the stacked parameters; with `layers` (one parameter dict per
    layer) a Python loop, whose outputs `y` are stacked like the scan's.
    """
    if layers is None:
      return jax.lax.scan(body, x, (self.blocks.stacked(), ada, extra))
    ys = []
    for i, p in enumerate(layers):
      x, y = body(x, (p, ada[i], jax.tree.map(lambda a, i=i: a[i], extra)))
      ys.append(y)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)

  def prefill_chunks(self, x_BLC, cond_BD, patch_nums, dtype=jnp.float32,
                     ada=None, layers=None):
    """One block-causal pass over the first scales, filling a KV cache chunk.

    Collaborative decoding (CoDe's `autoregressive_infer_cfg_refine`) hands
    the refiner the start tokens plus the teacher-forcing inputs of scales
    1..N; this runs them through every block at once, each token seeing its
    own scale and the coarser ones, as `__call__` does for the whole pyramid.

    Args:
      x_BLC: float32 (B, L', C) inputs with level/position embeddings added,
        L' = sum(pn * pn for pn in patch_nums).
      cond_BD: (B, C) class vectors of the rows.
      patch_nums: the scale sides of the prefix (a tuple; static), i.e.
        `cfg.patch_nums[:N + 1]`.
      dtype, ada, layers: as in `decode_chunks`.

    Returns:
      The final hidden states (B, L', C) and the chunk of every layer's
      keys/values (depth, B, H, L', c) in `dtype`, the first chunk of a
      cache that `decode_chunks` continues.
    """
    cfg = self.cfg
    patch_nums = tuple(patch_nums)
    if ada is None:
      ada = self.adaln_all(cond_BD, layers)

    def body(x, xs):
      p, ada_B6C, _ = xs

      def attn(q, k, v):
        b, l, h, c = q.shape
        heads = lambda a: _heads_first(a).reshape(b * h, l, c)
        o = attention.block_causal_attention(patch_nums, _scale(cfg), dtype,
                                             heads(q), heads(k), heads(v))
        o = _heads_first(o.reshape(b, h, l, c)).reshape(b, l, h * c)
        return o, (_heads_first(k).astype(dtype), _heads_first(v).astype(dtype))

      return _block(cfg, p, x, ada_B6C, attn, dtype)

    x, (k_new, v_new) = self._over_layers(
        body, x_BLC, ada, layers, jnp.arange(cfg.depth, dtype=jnp.int32))
    return x, KVCache(k_new, v_new)
