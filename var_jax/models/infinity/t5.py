"""The T5 encoder that conditions Infinity (flan-t5: gated-GELU feed-forward,
bucketed relative position bias, RMS layer norm without a mean).

`T5Encoder(cfg)(ids_BT, mask_BT)` gives the last hidden state (B, T, D) in
float32. Its layers are stacked (a leading `num_layers` axis) and run as one
`lax.scan`. Attention logits are not scaled by 1/sqrt(d_kv): T5 folds that
into its query weights. Only the first layer owns a position-bias table; every
layer adds the same bias.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from var_jax.models.layers import param, rms_norm

FSDP = "fsdp"


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The encoder half of a T5 v1.1 / flan-t5 checkpoint's `config.json`."""

  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  max_length: int = 512  # What Infinity's prompts are padded to.

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv


# google/flan-t5-xl, the text encoder of Infinity 2B and 8B.
FLAN_T5_XL = T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120,
                      num_layers=24, num_heads=32)


def relative_buckets(q_len: int, k_len: int, num_buckets: int,
                     max_distance: int) -> jax.Array:
  """(q_len, k_len) bucket ids of key position minus query position, as a
  bidirectional encoder buckets them: half the buckets per sign, exact up to
  a quarter of them, logarithmic beyond, the last bucket from
  `max_distance` on."""
  rel = jnp.arange(k_len)[None, :] - jnp.arange(q_len)[:, None]
  half = num_buckets // 2
  bucket = jnp.where(rel > 0, half, 0)
  n = jnp.abs(rel)
  exact = half // 2
  # Clamped below at 1 so the log is finite; those entries take `n` anyway.
  far = exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / exact)
                 / math.log(max_distance / exact)
                 * (half - exact)).astype(jnp.int32)
  far = jnp.minimum(far, half - 1)
  return bucket + jnp.where(n < exact, n, far)


# The weights a half-precision encoder stores in bfloat16 (norms and the
# relative position table stay float32).
MATRICES = ("embed", "q", "k", "v", "o", "wi0", "wi1", "wo")


class T5Encoder(nnx.Module):
  """Token ids -> contextual embeddings (the encoder's last hidden state)."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs | None = None):
    self.cfg = cfg
    rngs = rngs or nnx.Rngs(0)
    n, d, f, i = cfg.num_layers, cfg.d_model, cfg.d_ff, cfg.inner_dim

    def w(shape, fan_in, sharding):
      return param(jax.random.normal(rngs.params(), shape, jnp.float32)
                    / math.sqrt(fan_in), sharding)

    self.embed = w((cfg.vocab_size, d), d, (None, FSDP))
    self.rel_bias = w((cfg.relative_attention_num_buckets, cfg.num_heads), 1,
                      (None, None))
    self.ln1 = param(jnp.ones((n, d)), (None, None))
    self.q = w((n, d, i), d, (None, FSDP, None))
    self.k = w((n, d, i), d, (None, FSDP, None))
    self.v = w((n, d, i), d, (None, FSDP, None))
    self.o = w((n, i, d), i, (None, FSDP, None))
    self.ln2 = param(jnp.ones((n, d)), (None, None))
    self.wi0 = w((n, d, f), d, (None, FSDP, None))
    self.wi1 = w((n, d, f), d, (None, FSDP, None))
    self.wo = w((n, f, d), f, (None, FSDP, None))
    self.final_ln = param(jnp.ones((d,)), (None,))

  def position_bias(self, q_len: int, k_len: int) -> jax.Array:
    """(heads, q_len, k_len) float32."""
    cfg = self.cfg
    b = relative_buckets(q_len, k_len, cfg.relative_attention_num_buckets,
                         cfg.relative_attention_max_distance)
    return jnp.transpose(self.rel_bias[...][b], (2, 0, 1))

  def __call__(self, ids_BT: jax.Array, mask_BT: jax.Array | None = None,
               dtype=jnp.float32) -> jax.Array:
    """`mask_BT` (1 = token, 0 = padding; default all ones): padded keys are
    never attended to. `dtype`: the matmuls' input type (float32 sums)."""
    cfg = self.cfg
    b, t = ids_BT.shape
    h, dk, eps = cfg.num_heads, cfg.d_kv, cfg.layer_norm_epsilon
    bias_1HTT = self.position_bias(t, t)[None]
    if mask_BT is not None:
      hidden = jnp.finfo(jnp.float32).min
      bias_1HTT = bias_1HTT + jnp.where(
          jnp.asarray(mask_BT, bool), 0.0, hidden)[:, None, None, :]

    def mm(x, w_):
      return jnp.matmul(x.astype(dtype), w_.astype(dtype),
                        preferred_element_type=jnp.float32)

    def layer(x_BTD, p):
      y = rms_norm(x_BTD, p["ln1"], eps)
      q, k, v = (mm(y, p[n]).reshape(b, t, h, dk) for n in ("q", "k", "v"))
      s_BHTT = jnp.einsum("bqhc,bkhc->bhqk", q.astype(dtype), k.astype(dtype),
                          preferred_element_type=jnp.float32) + bias_1HTT
      a_BHTT = jax.nn.softmax(s_BHTT, axis=-1)
      o = jnp.einsum("bhqk,bkhc->bqhc", a_BHTT.astype(dtype), v.astype(dtype),
                     preferred_element_type=jnp.float32)
      x_BTD = x_BTD + mm(o.reshape(b, t, h * dk), p["o"])
      y = rms_norm(x_BTD, p["ln2"], eps)
      g = jax.nn.gelu(mm(y, p["wi0"]), approximate=True) * mm(y, p["wi1"])
      return x_BTD + mm(g, p["wo"]), None

    stacked = {n: getattr(self, n)[...] for n in
               ("ln1", "q", "k", "v", "o", "ln2", "wi0", "wi1", "wo")}
    x_BTD = self.embed[...][ids_BT].astype(jnp.float32)
    x_BTD, _ = jax.lax.scan(layer, x_BTD, stacked)
    return rms_norm(x_BTD, self.final_ln[...], eps)
