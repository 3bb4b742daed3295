"""The VAR transformer: AdaLN GPT-2 blocks over the multi-scale token pyramid.

The blocks come in one of two layouts, chosen per model instance:
"stacked" (`Blocks`: every parameter has a leading `depth` axis; the blocks run
as one `lax.scan`, so compile time stays flat in depth; training and
checkpoints use it) and "list" (`BlockList`: one buffer per layer and
parameter, run as a Python loop; XLA compiles depth copies of the block but
each layer reads its weights in place). `with_block_layout` converts between
them. Every parameter declares its sharding (mesh axis names) where it is
created.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from var_jax.models.layers import l2_normalize, layer_norm, param
from var_jax.models.var.config import REMAT_CHOICES, VARConfig
from var_jax.models import attention, scales

FSDP = "fsdp"


def _normal(key, shape, std):
  return std * jax.random.normal(key, shape, jnp.float32)


def _mm(x, w, dtype):
  """Matmul in the compute dtype with float32 accumulation and result."""
  return jnp.matmul(x.astype(dtype), w.astype(dtype),
                    preferred_element_type=jnp.float32)


class Linear(nnx.Module):
  """y = x W + b with W stored (in, out); shards the input axis over fsdp."""

  def __init__(self, din, dout, *, key, std, sharding=(FSDP, None)):
    self.kernel = param(_normal(key, (din, dout), std), sharding)
    self.bias = param(jnp.zeros((dout,), jnp.float32), (None,))

  def __call__(self, x, dtype=jnp.float32):
    return _mm(x, self.kernel[...], dtype) + self.bias[...]


class Embed(nnx.Module):

  def __init__(self, n, d, *, key, std):
    self.embedding = param(_normal(key, (n, d), std), (None, FSDP))

  def __call__(self, idx):
    return jnp.take(self.embedding[...], idx, axis=0)


class KVCache(NamedTuple):
  """Keys and values of every layer for a run of positions: (depth, R, H, n, c).

  Head-major, so each (row, head) attention reads contiguous keys.
  """
  k: jax.Array
  v: jax.Array

  def rows(self, take) -> "KVCache":
    """The cache with its row axis passed through `take` (e.g. a slice)."""
    return KVCache(take(self.k, 1), take(self.v, 1))


class Blocks(nnx.Module):
  """`depth` AdaLN self-attention blocks, parameters stacked on axis 0."""

  def __init__(self, cfg: VARConfig, *, key):
    d, c, f, h = cfg.depth, cfg.embed_dim, cfg.mlp_dim, cfg.num_heads
    self.cfg = cfg
    std = math.sqrt(1 / c / 3)
    ks = jax.random.split(key, 6)
    out_div = math.sqrt(2 * d)
    self.mat_qkv = param(_normal(ks[0], (d, c, 3 * c), std), (None, FSDP, None))
    self.q_bias = param(jnp.zeros((d, c)), (None, None))
    self.v_bias = param(jnp.zeros((d, c)), (None, None))
    self.scale_mul = param(jnp.full((d, h), math.log(4.0)), (None, None))
    self.proj_w = param(_normal(ks[1], (d, c, c), std / out_div),
                         (None, None, FSDP))
    self.proj_b = param(jnp.zeros((d, c)), (None, None))
    self.fc1_w = param(_normal(ks[2], (d, c, f), std), (None, FSDP, None))
    self.fc1_b = param(jnp.zeros((d, f)), (None, None))
    self.fc2_w = param(_normal(ks[3], (d, f, c), std / out_div),
                        (None, None, FSDP))
    self.fc2_b = param(jnp.zeros((d, c)), (None, None))
    # AdaLN gains: gamma (first 2C outputs) start near 0, scale/shift at 0.5x.
    gain = jnp.concatenate([jnp.full((2 * c,), 1e-5), jnp.full((4 * c,), 0.5)])
    if cfg.shared_aln:
      gss = jax.random.normal(ks[4], (d, 6, c)) / math.sqrt(c)
      self.ada_gss = param(gss * gain.reshape(6, c), (None, None, FSDP))
    else:
      self.ada_w = param(_normal(ks[4], (d, c, 6 * c), std) * gain,
                          (None, FSDP, None))
      self.ada_b = param(jnp.zeros((d, 6 * c)), (None, None))

  def stacked(self) -> dict[str, jax.Array]:
    """The per-layer parameter arrays, each with leading axis `depth`."""
    return {n: getattr(self, n)[...] for n in block_param_names(self.cfg)}


def block_param_names(cfg: VARConfig) -> tuple[str, ...]:
  """The parameters of one block, in `Blocks.stacked` order."""
  ada = ("ada_gss",) if cfg.shared_aln else ("ada_w", "ada_b")
  return ("mat_qkv", "q_bias", "v_bias", "scale_mul", "proj_w", "proj_b",
          "fc1_w", "fc1_b", "fc2_w", "fc2_b") + ada


# Block matrices the list layout stores as (out, in), torch's nn.Linear
# layout: the transpose back is folded into each dot, which then streams the
# weight rows in order (faster for the few-row matmuls of small scales on
# CPU; see docs/performance.md).
_ROW_MAJOR = ("mat_qkv", "proj_w", "fc1_w", "fc2_w")


def _stored(name, a):
  """One layer's parameter as the list layout stores it (and back: an
  involution)."""
  return a.T if name in _ROW_MAJOR else a


class BlockList(nnx.Module):
  """The same blocks as `Blocks`, one set of buffers per layer."""

  def __init__(self, cfg: VARConfig, layers: list[dict[str, jax.Array]]):
    self.cfg = cfg
    self.layers = nnx.List([
        nnx.Dict({n: nnx.Param(_stored(n, p[n])) for n in p}) for p in layers])

  def params(self) -> list[dict[str, jax.Array]]:
    """One dict of block parameters per layer, in `Blocks` orientation."""
    return [{n: _stored(n, layer[n][...]) for n in layer}
            for layer in self.layers]


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
    q = l2_normalize(q) * mul[None, None, :, None]
    k = l2_normalize(k)
  return q, k, v


def _scale(cfg) -> float:
  """Score multiplier (with L2-normalised q/k the learned scale is in q)."""
  return 1.0 if cfg.attn_l2_norm else 0.25 / math.sqrt(cfg.head_dim)


def _attend_block_causal(cfg, q_BLHc, k_BLHc, v_BLHc, dtype, patch_nums):
  """Attention over a scale prefix, each token seeing its own scale and the
  coarser ones -> (B, L, H * c); L = sum(pn * pn for pn in patch_nums).

  The implementation follows the backend (`attention.training_attention`).
  """
  b, l, h, c = q_BLHc.shape
  heads = lambda a: _heads_first(a).reshape(b * h, l, c)
  o = attention.training_attention(
      tuple(patch_nums), _scale(cfg), dtype, heads(q_BLHc),
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


# Rematerialisation of the teacher-forced blocks: name -> checkpoint policy
# (None: no block-level checkpoint).
REMAT = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "block": jax.checkpoint_policies.nothing_saveable,
}
assert tuple(REMAT) == REMAT_CHOICES


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
    self.pos_start = param(_normal(ks[2], (1, cfg.first_l, c), std),
                            (None, None, FSDP))
    self.pos_1LC = param(_normal(ks[3], (1, cfg.seq_len, c), std),
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
               dtype=jnp.float32, remat: str = "none",
               unroll: bool = False) -> jax.Array:
    """Teacher-forced logits (B, L, V).

    Args:
      labels_B: class ids; `num_classes` is the null (unconditional) class.
      x_BLCvae: `idx_to_var_input` of the ground truth, (B, L - first_l, Cvae).
      dropout_key: enables training-time class dropout and drop-path.
      dtype: matmul compute dtype (params and residual stream stay float32).
      remat: what the backward pass recomputes (`REMAT`): "none" (only the
        MLP's norm and GELU), "dots" (each block keeps its weight matmuls'
        outputs, recomputes the rest), "block" (each block keeps its input
        only and runs again in the backward pass).
      unroll: unroll the layer scan (same values; for FLOP counting).
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

    keep = None
    if dropout_key is not None and cfg.drop_path_rate > 0:
      rates = jnp.linspace(0.0, cfg.drop_path_rate, cfg.depth)
      keys = jax.random.split(k_path, cfg.depth)
      keep = jax.vmap(lambda k_, r: jax.random.bernoulli(
          k_, 1 - r, (b, 1, 1)).astype(jnp.float32) / (1 - r))(keys, rates)
    cond = self.block_cond(cond_BD)

    def body(x, xs):
      p, keep_B = xs
      attn = lambda q, k, v: (_attend_block_causal(cfg, q, k, v, dtype,
                                                   cfg.patch_nums), None)
      return _block(cfg, p, x, _adaln(cfg, p, cond), attn, dtype, keep_B)

    if REMAT[remat] is not None:
      body = jax.checkpoint(body, policy=REMAT[remat], prevent_cse=False)
    x, _ = self._over_layers(body, x, keep, unroll)
    return self.logits(x, cond_BD)

  # ------------------------------------------------------------ the layer loop
  def block_layout(self) -> str:
    """"stacked" or "list" (see the module docstring)."""
    return "stacked" if isinstance(self.blocks, Blocks) else "list"

  def _over_layers(self, body, x, extra, unroll: bool = False):
    """Applies `body(x, (params, extra_i)) -> (x, y)` to every block in turn.

    `extra` is a pytree with a leading depth axis (or None). The stacked
    layout scans (`unroll`: fully unrolled, e.g. so that a compiler's cost
    analysis sees every layer); the list layout loops in Python and stacks
    the `y`s as the scan would.
    """
    if isinstance(self.blocks, Blocks):
      return jax.lax.scan(body, x, (self.blocks.stacked(), extra),
                          unroll=unroll)
    ys = []
    for i, p in enumerate(self.blocks.params()):
      x, y = body(x, (p, jax.tree.map(lambda a, i=i: a[i], extra)))
      ys.append(y)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)

  # ------------------------------------------------------------ cached decoding
  def adaln_all(self, cond_BD) -> jax.Array:
    """(depth, R, 6, C) AdaLN modulation of every block.

    It depends only on the class, so cached decoding computes it once per
    sample rather than once per scale (each time re-reading depth * 6C^2
    weights) and passes it to `decode`.
    """
    cond = self.block_cond(cond_BD)
    _, ada = self._over_layers(
        lambda c, xs: (c, _adaln(self.cfg, xs[0], cond)), None, None)
    return ada

  def decode(self, x_RlC, ada, past: tuple, dtype=jnp.float32, buffer=None):
    """Runs every block on one scale's new tokens against a KV cache.

    Args:
      x_RlC: the inputs (R, l, C), level/position embeddings included.
      ada: `adaln_all` of the rows' classes.
      past: the finished chunks of the cache (`KVCache`s, in position order);
        every one of their positions is visible.
      dtype: matmul compute dtype; the new keys/values are stored in it.
      buffer: None when `x_RlC` holds exactly the scale's tokens: the new
        keys/values come back as the next chunk (depth, R, H, l, c).
        Otherwise `(cache, offset, limit)` for scales padded to a common
        length: the new keys/values are written into `cache` (depth, R, H,
        n, c) at `offset` and its positions at or past `limit` are hidden
        (both may be traced); the updated cache comes back.

    Returns:
      The final hidden states (R, l, C) and the new chunk or buffer.
    """
    cfg = self.cfg
    n_past = sum(ch.k.shape[3] for ch in past)
    if buffer is not None:
      cache, offset, limit = buffer
      visible = jnp.arange(n_past + cache.k.shape[3]) < n_past + limit
      bias = jnp.where(visible, 0.0, attention.NEG)[None, :]
      at = (0, 0, jnp.asarray(offset, jnp.int32), 0)

    def body(x, xs):
      p, (ada_i, old, buf) = xs

      def attn(q, k, v):
        k_new = _heads_first(k).astype(dtype)
        v_new = _heads_first(v).astype(dtype)
        if buf is not None:
          k_new = jax.lax.dynamic_update_slice(buf.k, k_new, at)
          v_new = jax.lax.dynamic_update_slice(buf.v, v_new, at)
        k_all = jnp.concatenate([c.k for c in old] + [k_new], axis=2)
        v_all = jnp.concatenate([c.v for c in old] + [v_new], axis=2)
        o = _attend_heads(cfg, q, k_all, v_all,
                          0.0 if buf is None else bias, dtype)
        return o, KVCache(k_new, v_new)

      return _block(cfg, p, x, ada_i, attn, dtype)

    return self._over_layers(
        body, x_RlC, (ada, past, None if buffer is None else buffer[0]))

  def prefill(self, x_RLC, ada, patch_nums, dtype=jnp.float32):
    """One block-causal pass over a prefix of scales, filling a KV cache.

    Collaborative decoding's refiner (CoDe's `autoregressive_infer_cfg_refine`)
    starts at scale N from the drafter's inputs of scales 1..N: all of them
    go through the blocks at once, each token seeing its own scale and the
    coarser ones, as in teacher forcing.

    Args:
      x_RLC: (R, L', C) inputs, level/position embeddings added, L' = sum(pn
        * pn for pn in patch_nums).
      ada: `adaln_all` of the rows' classes.
      patch_nums: the prefix's scale sides (static), `cfg.patch_nums[:N + 1]`.
      dtype: as in `decode`.

    Returns:
      The final hidden states (R, L', C) and the keys/values of all L'
      positions (depth, R, H, L', c), the first chunk of a cache.
    """
    cfg = self.cfg

    def body(x, xs):
      p, ada_i = xs

      def attn(q, k, v):
        o = _attend_block_causal(cfg, q, k, v, dtype, patch_nums)
        return o, KVCache(_heads_first(k).astype(dtype),
                          _heads_first(v).astype(dtype))

      return _block(cfg, p, x, ada_i, attn, dtype)

    return self._over_layers(body, x_RLC, ada)


def with_block_layout(var: VAR, block_layout: str) -> VAR:
  """`var` with its blocks in `block_layout` ("stacked" or "list").

  Returns `var` itself when it already has that layout; otherwise a new
  model that shares every other parameter and holds a converted copy of
  the blocks (the caller's model is unchanged).
  """
  if block_layout not in BLOCK_LAYOUTS:
    raise ValueError(f"block_layout must be one of {BLOCK_LAYOUTS}, got "
                     f"{block_layout!r}")
  if var.block_layout() == block_layout:
    return var
  new = nnx.merge(*nnx.split(var))
  cfg = var.cfg
  if block_layout == "list":
    stacked = var.blocks.stacked()
    new.blocks = BlockList(cfg, [{n: a[i] for n, a in stacked.items()}
                                 for i in range(cfg.depth)])
  else:
    layers = var.blocks.params()
    blocks = nnx.eval_shape(lambda: Blocks(cfg, key=jax.random.key(0)))
    for n in block_param_names(cfg):
      getattr(blocks, n).set_value(jnp.stack([p[n] for p in layers]))
    new.blocks = blocks
  return new


BLOCK_LAYOUTS = ("stacked", "list")


def without_training_fields(var: VAR) -> VAR:
  """`var` with the training-only config fields (class dropout, drop-path)
  at zero; every array is shared.

  The config is static in a compiled program's key; zeroing what inference
  never reads lets models that differ only there (a converted checkpoint and
  the same weights under a preset) share their compiled samplers.
  """
  cfg = dataclasses.replace(var.cfg, cond_drop_rate=0.0, drop_path_rate=0.0)
  if cfg == var.cfg:
    return var
  new = nnx.merge(*nnx.split(var))
  for _, node in nnx.iter_graph(new):
    if isinstance(node, nnx.Module) and getattr(node, "cfg", None) == var.cfg:
      node.cfg = cfg
  return new
