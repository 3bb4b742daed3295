"""InceptionV3 of the TensorFlow graph of 2015-12-05 (the FID network), NHWC.

The network FID, sFID and the Inception Score are defined on: the frozen TF
graph `classify_image_graph_def.pb` that the ADM evaluator
(openai/guided-diffusion `evaluations/evaluator.py`) and TTUR run, laid out
as torch-fidelity's `FeatureExtractorInceptionV3` lays it out, so that its
weight file (`weights-inception-2015-12-05-6726825d.pth`) loads through
`var_jax.convert.inception`. What sets it apart from the torchvision
InceptionV3:

* the input is uint8 of any size, resized to 299x299 with TensorFlow 1's
  bilinear rule (half-open grid `i * in / out`, no half-pixel offset, edge
  clamp), then mapped to `(x - 128) / 128`;
* the 3x3 average pools of the A, C and first E blocks leave the padding out
  of the average; the last E block pools its pool branch with a max, not an
  average;
* BatchNorm has eps 1e-3 and the classifier has 1008 outputs.

Math only: no file I/O. The weights are random until a converter fills them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
BN_EPS = 1e-3
NUM_LOGITS = 1008
POOL_DIM = 2048
# The ADM sFID feature keeps the first 7 channels of a 17x17 map.
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
FEATURES = ("64", "192", "768", "pool", "logits_unbiased", "logits", "spatial",
            "mixed_3_spatial")
FEATURE_DIMS = {"64": 64, "192": 192, "768": 768, "pool": POOL_DIM,
                "logits_unbiased": NUM_LOGITS, "logits": NUM_LOGITS,
                "spatial": SPATIAL_DIM, "mixed_3_spatial": SPATIAL_DIM}


def _tf1_grid(n_in: int, n_out: int):
  """Source rows of TF1's `resize_bilinear(align_corners=False)` (numpy).

  Returns (lo, hi, frac): int32 (n_out,) neighbours and float32 (n_out,)
  weights of `hi`. The position of output i is `float32(i) * float32(in /
  out)` in float32 arithmetic, truncated for `lo`, as TF1's kernel (and
  torch-fidelity's "slow" reimplementation) computes it.
  """
  scale = np.float32(n_in / n_out)
  pos = np.arange(n_out, dtype=np.float32) * scale
  lo = pos.astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo.astype(np.float32)
  return lo.astype(np.int32), hi.astype(np.int32), frac


def resize_tf1(x_BHWC: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """TensorFlow-1-exact bilinear resize (align_corners=False), float32.

  Args:
    x_BHWC: images, any real dtype (uint8 0..255 typically), shape
      (B, H, W, C).
    size: output side.

  Returns:
    float32 (B, size, size, C), interpolated as `a + (b - a) * t` along W,
    then along H, as TF1's CPU kernel does (bit-exact with it on the CPU).
  """
  x = x_BHWC.astype(jnp.float32)
  _, h, w, _ = x.shape
  if (h, w) == (size, size):
    return x  # Scale 1: every weight is 0, the kernel copies.
  ylo, yhi, fy = _tf1_grid(h, size)
  xlo, xhi, fx = _tf1_grid(w, size)
  top, bottom = x[:, ylo], x[:, yhi]
  fx = jnp.asarray(fx)[None, None, :, None]
  t0, t1 = top[:, :, xlo], top[:, :, xhi]
  b0, b1 = bottom[:, :, xlo], bottom[:, :, xhi]
  upper = t0 + (t1 - t0) * fx
  lower = b0 + (b1 - b0) * fx
  return upper + (lower - upper) * jnp.asarray(fy)[None, :, None, None]


def _max_pool(x, stride: int, pad: int):
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                               (1, stride, stride, 1), padding)


def _avg_pool_no_pad(x_BHWC):
  """3x3, stride 1, pad 1 average that divides by the in-image count only
  (TF's SAME average pool; torch's `count_include_pad=False`)."""
  _, h, w, _ = x_BHWC.shape
  s = jax.lax.reduce_window(x_BHWC, jnp.zeros((), x_BHWC.dtype), jax.lax.add,
                            (1, 3, 3, 1), (1, 1, 1, 1),
                            ((0, 0), (1, 1), (1, 1), (0, 0)))

  def counts(n):
    c = np.full((n,), 3.0, np.float32)
    c[0] -= 1
    c[-1] -= 1
    return c if n > 1 else np.ones((1,), np.float32)

  count_HW = np.outer(counts(h), counts(w))[None, :, :, None]
  return s / jnp.asarray(count_HW, x_BHWC.dtype)


class BasicConv2d(nnx.Module):
  """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU.

  The BatchNorm is folded into the kernel and a bias at call time (a few
  thousand multiplies on the weights instead of a pass over the activations).
  """

  def __init__(self, cin: int, cout: int, kernel, stride: int = 1,
               padding=(0, 0), *, rngs: nnx.Rngs):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = padding
    self.conv = nnx.Conv(cin, cout, (kh, kw), strides=stride,
                         padding=((ph, ph), (pw, pw)), use_bias=False,
                         rngs=rngs)
    self.bn = nnx.BatchNorm(cout, epsilon=BN_EPS, use_running_average=True,
                            rngs=rngs)
    self.stride = stride
    self.padding = ((ph, ph), (pw, pw))

  def __call__(self, x_BHWC):
    bn = self.bn
    scale_C = bn.scale.value * jax.lax.rsqrt(bn.var.value + BN_EPS)
    shift_C = bn.bias.value - bn.mean.value * scale_C
    k_HWIO = (self.conv.kernel.value * scale_C).astype(x_BHWC.dtype)
    y = jax.lax.conv_general_dilated(
        x_BHWC, k_HWIO, (self.stride, self.stride), self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + shift_C.astype(y.dtype))


def _cat(branches):
  return jnp.concatenate(branches, axis=-1)


class InceptionA(nnx.Module):
  """35x35 block (TF `mixed`, `mixed_1`, `mixed_2`)."""

  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=(2, 2), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=(1, 1), rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=(1, 1), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return [self.branch1x1(x), b5, b3,
            self.branch_pool(_avg_pool_no_pad(x))]


class InceptionB(nnx.Module):
  """35 -> 17 reduction (TF `mixed_3`)."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=(1, 1), rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return [self.branch3x3(x), b3, _max_pool(x, 2, 0)]


class InceptionC(nnx.Module):
  """17x17 block with factorised 7x7 convolutions (TF `mixed_4`..`mixed_7`)."""

  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    row, col = dict(padding=(0, 3)), dict(padding=(3, 0))
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), **row, rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), **col, rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), **col, rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), **row, rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), **col, rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), **row, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = self.branch7x7dbl_1(x)
    for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3,
                 self.branch7x7dbl_4, self.branch7x7dbl_5):
      d = conv(d)
    return [self.branch1x1(x), b7, d,
            self.branch_pool(_avg_pool_no_pad(x))]


class InceptionD(nnx.Module):
  """17 -> 8 reduction (TF `mixed_8`)."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3),
                                     rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0),
                                     rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_1(x)
    for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = conv(b7)
    return [b3, b7, _max_pool(x, 2, 0)]


class InceptionE(nnx.Module):
  """8x8 block with split 1x3/3x1 outputs (TF `mixed_9`, `mixed_10`).

  `pool="max"` is the last block of the TF graph, which max-pools its pool
  branch (3x3, stride 1, pad 1).
  """

  def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
    row, col = dict(padding=(0, 1)), dict(padding=(1, 0))
    self.pool = pool
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), **row, rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), **col, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=(1, 1), rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), **row, rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), **col, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _max_pool(x, 1, 1) if self.pool == "max" else _avg_pool_no_pad(x)
    return [self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled)]


class InceptionV3(nnx.Module):
  """The FID InceptionV3 (TF graph of 2015-12-05), torch-fidelity's names.

  Call it on uint8 images (B, H, W, 3) of any size; it returns a dict of
  float32 features (see `__call__`). `dtype` is the activation dtype of the
  convolutions (float32 for the reference numbers).
  """

  def __init__(self, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.dtype = dtype
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=(1, 1), rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
    self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)
    self.fc = nnx.Linear(POOL_DIM, NUM_LOGITS, rngs=rngs)

  def __call__(self, x_BHWC) -> dict[str, jax.Array]:
    """Features of uint8 images.

    Args:
      x_BHWC: uint8 (B, H, W, 3), values 0..255, any H and W.

    Returns:
      float32 arrays keyed by name:
        `64`, `192`, `768`: (B, C) spatial means after the first and second
          max pools and after Mixed_6e;
        `pool`: (B, 2048), TF `pool_3`, the FID feature;
        `logits_unbiased`: (B, 1008), pool @ fc.weight.T without the bias
          (what the ADM evaluator's softmax takes for the IS);
        `logits`: (B, 1008) with the bias;
        `spatial`: (B, 2023), the ADM sFID feature, TF tensor
          `mixed_6/conv:0`: the ReLU output of Mixed_6d's 1x1 branch
          (17, 17, 192; TF's `mixed_6` is the third 17x17 block, as
          torch-fidelity's weight conversion table maps it), first 7
          channels, flattened in (H, W, C) order;
        `mixed_3_spatial`: (B, 2023), the same cut of TF `mixed_3/conv`
          (Mixed_6a's stride-2 3x3 branch, 17, 17, 384), which the golden
          set stores under `spatial`; kept to check the network against it.
    """
    return self.features(resize_tf1(x_BHWC, INPUT_SIZE))

  def features(self, x_BHWC) -> dict[str, jax.Array]:
    """`__call__`'s features of images already resized to 299 x 299
    (float32, 0..255, as `resize_tf1` gives them)."""
    x = ((x_BHWC - 128.0) / 128.0).astype(self.dtype)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool(x, 2, 0)
    out = {"64": x}
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool(x, 2, 0)
    out["192"] = x
    for blk in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d):
      x = _cat(blk(x))
    branches = self.Mixed_6a(x)
    taps = {"mixed_3_spatial": branches[0]}
    x = _cat(branches)
    for blk in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
      branches = blk(x)
      if blk is self.Mixed_6d:
        taps["spatial"] = branches[0]  # TF mixed_6/conv.
      x = _cat(branches)
    out["768"] = x
    x = _cat(self.Mixed_7a(x))
    x = _cat(self.Mixed_7b(x))
    x = _cat(self.Mixed_7c(x))
    out["pool"] = x
    feats = {k: jnp.mean(v.astype(jnp.float32), axis=(1, 2))
             for k, v in out.items()}
    pool = feats["pool"]
    kernel = self.fc.kernel.value.astype(jnp.float32)
    feats["logits_unbiased"] = jnp.dot(pool, kernel,
                                       precision=jax.lax.Precision.HIGHEST)
    feats["logits"] = feats["logits_unbiased"] + self.fc.bias.value
    for name, t_BHWC in taps.items():
      t = t_BHWC[..., :SPATIAL_CHANNELS].astype(jnp.float32)
      feats[name] = t.reshape(t.shape[0], -1)
    return feats
