"""Block-causal attention for teacher forcing, with a memory-light gradient.

A token attends to its own scale and every coarser one, so the (L, L) score
matrix is block lower-triangular: at 256px, 37% of it is masked out. The
rows are cut into segments along scale boundaries; a segment attends only to
the key prefix it can see, and a segment of one scale needs no mask at all.

The gradient is written by hand (the flash-attention recipe): the forward
keeps only the output and the row log-sum-exp, and the backward recomputes
the probabilities segment by segment. Autodiff of a plain softmax would keep
every layer's (B, H, L, L) probabilities for the backward pass (1.9 GB per
step for d16 at batch 4) and stream them through memory several times.

On the CPU, the (row, head) pairs of a segment are processed in groups whose
score tiles fit in a few MiB, so the softmax and its gradient run in cache;
on accelerators every segment is one fused batch (`tiled`).

`training_attention` (end of the file) is what the transformer calls: this
form on the CPU, the TPU splash kernel or `jax.nn.dot_product_attention`
elsewhere, chosen at trace time.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models import scales

# Largest score tile (bytes) one step of the grouped loops materialises.
TILE_BYTES = 4 << 20
# Consecutive scales are merged into one segment until it has this many rows
# (tiny scales alone would make tiny matmuls).
_MIN_SEGMENT_ROWS = 64
NEG = -1e30  # Finite "-inf" for masks: keeps fully masked rows NaN-free.


def group_size(n: int, rows: int, keys: int) -> int:
  """Largest divisor g of n with a (g, rows, keys) float32 tile in budget."""
  fits = [d for d in range(1, n + 1)
          if n % d == 0 and d * rows * keys * 4 <= TILE_BYTES]
  return max(fits or [1])


def segments(patch_nums) -> tuple[tuple[int, int, int], ...]:
  """(row_begin, row_end, first_scale) of each segment, in order."""
  ends = scales.layout(tuple(patch_nums)).ends
  out, begin, first = [], 0, 0
  for i, row in enumerate(ends):
    if row - begin >= _MIN_SEGMENT_ROWS or i == len(ends) - 1:
      out.append((begin, row, first))
      begin, first = row, i + 1
  return tuple(out)


def block_causal_bias(patch_nums) -> np.ndarray:
  """(L, L) additive mask: a token sees its own scale and all coarser ones."""
  lvl = scales.layout(tuple(patch_nums)).level_ids()
  return np.where(lvl[:, None] >= lvl[None, :], 0.0, NEG).astype(np.float32)


def _segment_bias(patch_nums, begin: int, end: int) -> np.ndarray | None:
  """(rows, keys) mask of a segment's rows, None when nothing is masked."""
  bias = block_causal_bias(patch_nums)[begin:end, :end]
  return bias if bias.any() else None


def tiled() -> bool:
  """Whether programs traced now cut attention into cache-sized tiles.

  Only on the CPU, where an (N, l, S) score tensor far larger than the caches
  is slow to write and re-read; accelerators run the fused batch. The
  platform is the `on_mesh` mesh's, else the default backend's.
  """
  return _platform() == "cpu"


def _mapped(fn, n: int, rows: int, keys: int, *args):
  """Applies fn to groups of the leading axis of every arg; stacks results."""
  g = group_size(n, rows, keys) if tiled() else n
  if g == n:
    return fn(*args)
  grouped = [a.reshape((n // g, g) + a.shape[1:]) for a in args]
  out = jax.lax.map(lambda xs: fn(*xs), grouped)
  return jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), out)


def _scores(q, k, bias, scale, dtype):
  s = jnp.einsum("nlc,nsc->nls", q.astype(dtype), k.astype(dtype),
                 preferred_element_type=jnp.float32) * scale
  return s if bias is None else s + bias


def _fwd_tile(q, k, v, bias, scale, dtype):
  s = _scores(q, k, bias, scale, dtype)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  den = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("nls,nsc->nlc", (p / den).astype(dtype), v.astype(dtype),
                 preferred_element_type=jnp.float32)
  return o, (m + jnp.log(den))[..., 0]


def _bwd_tile(q, k, v, o, lse, do, bias, scale, dtype):
  p = jnp.exp(_scores(q, k, bias, scale, dtype) - lse[..., None])
  dv = jnp.einsum("nls,nlc->nsc", p.astype(dtype), do.astype(dtype),
                  preferred_element_type=jnp.float32)
  dp = jnp.einsum("nlc,nsc->nls", do.astype(dtype), v.astype(dtype),
                  preferred_element_type=jnp.float32)
  ds = p * (dp - jnp.sum(do * o, axis=-1, keepdims=True)) * scale
  dq = jnp.einsum("nls,nsc->nlc", ds.astype(dtype), k.astype(dtype),
                  preferred_element_type=jnp.float32)
  dk = jnp.einsum("nls,nlc->nsc", ds.astype(dtype), q.astype(dtype),
                  preferred_element_type=jnp.float32)
  return dq, dk, dv


def grouped_attention(q_NlC, k_NSc, v_NSc, bias_lS, scale, dtype):
  """softmax(q k^T * scale + bias) v over independent (row, head) pairs.

  q (N, l, c), k/v (N, S, c), bias broadcastable to (l, S) or None; on the
  CPU in groups of pairs whose scores fit in a few MiB (`tiled`).
  """
  n, l, _ = q_NlC.shape
  fn = functools.partial(_fwd_tile, bias=bias_lS, scale=scale, dtype=dtype)
  return _mapped(fn, n, l, k_NSc.shape[1], q_NlC, k_NSc, v_NSc)[0]


def _forward(patch_nums, scale, dtype, q, k, v):
  n = q.shape[0]
  outs, lses = [], []
  for begin, end, _ in segments(patch_nums):
    bias = _segment_bias(patch_nums, begin, end)
    fn = functools.partial(_fwd_tile, bias=bias, scale=scale, dtype=dtype)
    o, lse = _mapped(fn, n, end - begin, end, q[:, begin:end], k[:, :end],
                     v[:, :end])
    outs.append(o)
    lses.append(lse)
  return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def block_causal_attention(patch_nums, scale, dtype, q_NLc, k_NLc, v_NLc):
  """softmax(q k^T * scale + block-causal mask) v, head-major.

  Args:
    patch_nums: the scale sides (a tuple; static).
    scale: multiplier of the scores (static).
    dtype: matmul compute dtype; softmax and results are float32.
    q_NLc, k_NLc, v_NLc: (N, L, c) with N = batch x heads.

  Returns:
    (N, L, c) float32.
  """
  return _forward(patch_nums, scale, dtype, q_NLc, k_NLc, v_NLc)[0]


def _vjp_fwd(patch_nums, scale, dtype, q, k, v):
  o, lse = _forward(patch_nums, scale, dtype, q, k, v)
  return o, (q, k, v, o, lse)


def _vjp_bwd(patch_nums, scale, dtype, res, do):
  q, k, v, o, lse = res
  n, seq_len, _ = q.shape
  dq_parts = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for begin, end, _ in segments(patch_nums):
    bias = _segment_bias(patch_nums, begin, end)
    fn = functools.partial(_bwd_tile, bias=bias, scale=scale, dtype=dtype)
    rows = slice(begin, end)
    dq_s, dk_s, dv_s = _mapped(fn, n, end - begin, end, q[:, rows], k[:, :end],
                               v[:, :end], o[:, rows], lse[:, rows], do[:, rows])
    dq_parts.append(dq_s)
    pad = ((0, 0), (0, seq_len - end), (0, 0))
    dk = dk + jnp.pad(dk_s, pad)
    dv = dv + jnp.pad(dv_s, pad)
  dq = jnp.concatenate(dq_parts, axis=1)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


block_causal_attention.defvjp(_vjp_fwd, _vjp_bwd)


# --------------------------------------------------------------------------
# The training attention by backend.
#
# TPU: splash attention (Pallas), which skips every (128 x 128) block of the
# padded score matrix that the mask hides entirely and computes the mask
# only on blocks it cuts: 256px pads 680 -> 768 and computes 28 of 36 blocks,
# 512px pads 2,240 -> 2,304 and computes 222 of 324 (0.73x the dense 2,240^2).
# GPU: `jax.nn.dot_product_attention` with the mask (cuDNN for 16-bit
# inputs where it accepts them, XLA otherwise). CPU: the tiled form above.

IMPLS = ("splash", "xla", "cpu")
_PLATFORM_IMPLS = {"tpu": "splash", "cpu": "cpu"}  # Anything else: "xla".
SPLASH_BLOCK = 128  # Splash tile side; the sequence is padded to a multiple.

_context = threading.local()


@contextlib.contextmanager
def _scoped(name: str, value):
  """Sets `_context.<name>` to `value` for the block (this thread)."""
  prev = getattr(_context, name, None)
  setattr(_context, name, value)
  try:
    yield value
  finally:
    setattr(_context, name, prev)


def on_mesh(mesh):
  """Attention traced inside runs on `mesh` (a `jax.sharding.Mesh`).

  Its devices' platform chooses the implementation (`impl_for`), so a
  program for compile-only TPU devices gets the TPU kernel on a CPU host;
  splash attention is mapped over all the mesh's axes (`shard_map`) along
  the (row, head) axis, which must be split as the batch is (the mesh's
  axes Auto, as `training.mesh.make_mesh` makes them). Trace-time only:
  enter it inside the jitted function.
  """
  return _scoped("mesh", mesh)


def _current_mesh():
  return getattr(_context, "mesh", None)


def using(impl: str):
  """Training attention traced inside runs as `impl` (one of IMPLS) whatever
  the platform, e.g. XLA's dense form on a TPU mesh to compare it with
  splash. Trace-time only, like `on_mesh`."""
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}: expected one of "
                     f"{IMPLS}")
  return _scoped("impl", impl)


def _platform() -> str:
  """The platform programs traced now are for: the `on_mesh` mesh's, else
  the default backend's."""
  mesh = _current_mesh()
  return (mesh.devices.flat[0].platform if mesh is not None
          else jax.default_backend())


def impl_for(platform: str | None = None) -> str:
  """The training attention for a platform ("tpu", "gpu", "cpu", ...).

  None: the platform of the `on_mesh` mesh if one is set, else
  `jax.default_backend()`; static, decided at trace time. Splash only runs
  under `on_mesh` (the train and eval steps): XLA cannot partition a Mosaic
  kernel over sharded inputs ("Mosaic kernels cannot be automatically
  partitioned"), so a TPU program without a declared mesh (the sampler's
  prefill) keeps the segment form ("cpu", untiled off the CPU).
  """
  if platform is None and getattr(_context, "impl", None) is not None:
    return _context.impl
  if platform is None:
    mesh = _current_mesh()
    if mesh is None:
      platform = jax.default_backend()
      if platform == "tpu":
        return "cpu"
    else:
      platform = mesh.devices.flat[0].platform
  return _PLATFORM_IMPLS.get(platform, "xla")


def padded_length(seq_len: int, block: int = SPLASH_BLOCK) -> int:
  """seq_len rounded up to a multiple of block (680 -> 768, 2240 -> 2304)."""
  return -(-seq_len // block) * block


def splash_mask(patch_nums, block: int = SPLASH_BLOCK) -> np.ndarray:
  """(P, P) bool mask over the padded sequence: True where q may see k.

  Real rows see their own scale and every coarser one, never the padding;
  padded rows form one extra level after the last, so they see everything
  (no row is fully masked, and their outputs are sliced off).
  """
  layout = scales.layout(tuple(patch_nums))
  p = padded_length(layout.seq_len, block)
  lvl = np.concatenate([layout.level_ids(),
                        np.full(p - layout.seq_len, layout.num_scales,
                                np.int32)])
  return lvl[:, None] >= lvl[None, :]


@functools.lru_cache(maxsize=None)
def _splash_kernel(patch_nums, block: int, interpret: bool):
  """A single-head splash kernel for the padded block-causal mask."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  mask = sa.MultiHeadMask([sa.NumpyMask(splash_mask(patch_nums, block))])
  sizes = sa.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1,
                            q_seq_shards=1, interpret=interpret)


def splash_attention(patch_nums, scale, dtype, q_NLc, k_NLc, v_NLc, *,
                     interpret: bool = False, block: int = SPLASH_BLOCK):
  """`block_causal_attention` by the TPU splash kernel -> (N, L, c) float32.

  The sequence is padded to a multiple of `block`; every (row, head) pair
  is one single-head kernel call (vmapped), so the kernel's block-sparsity
  table is the same for all of them. `interpret` runs the kernel in the
  Pallas interpreter (any backend; for tests). Under `on_mesh` the pairs
  are split over all the mesh's devices (shard_map), as the batch is.
  """
  patch_nums = tuple(patch_nums)
  n, seq_len, _ = q_NLc.shape
  pad = padded_length(seq_len, block)
  kernel = _splash_kernel(patch_nums, block, interpret)

  def prepare(a, mul=None):
    a = a.astype(jnp.float32) * mul if mul is not None else a
    return jnp.pad(a.astype(dtype), ((0, 0), (0, pad - seq_len), (0, 0)))

  def run(q, k, v):  # (n, P, c) each -> (n, P, c)
    one = lambda q, k, v: kernel(q[None], k[None], v[None])[0]
    return jax.vmap(one)(q, k, v)

  mesh = _current_mesh()
  if mesh is not None and mesh.devices.size > 1 and n % mesh.devices.size == 0:
    rows = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    run = jax.shard_map(run, mesh=mesh, in_specs=(rows,) * 3,
                        out_specs=rows, check_vma=False)
  o = run(prepare(q_NLc, scale), prepare(k_NLc), prepare(v_NLc))
  return o[:, :seq_len].astype(jnp.float32)


def xla_attention(patch_nums, scale, dtype, q_NLc, k_NLc, v_NLc, *,
                  cudnn: bool = False):
  """`block_causal_attention` by `jax.nn.dot_product_attention`.

  With `cudnn` (GPU) and 16-bit `dtype`, cuDNN's fused kernel where it
  accepts the shapes (it refuses float32, and some head sizes), else XLA's.
  Autodiff gives the gradient. -> (N, L, c) float32.
  """
  mask = jnp.asarray(block_causal_bias(tuple(patch_nums)) == 0)[None, None]
  q, k, v = (a.astype(dtype)[:, :, None, :] for a in (q_NLc, k_NLc, v_NLc))
  o = None
  if cudnn and jnp.dtype(dtype).itemsize == 2:
    try:
      o = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                       implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError, TypeError):
      o = None  # Not accepted: XLA's below.
  if o is None:
    o = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                     implementation="xla")
  return o[:, :, 0, :].astype(jnp.float32)


def training_attention(patch_nums, scale, dtype, q_NLc, k_NLc, v_NLc, *,
                       impl: str | None = None, interpret: bool = False):
  """Block-causal attention over scales by the backend's best form.

  Same contract as `block_causal_attention` (N = batch x heads, (N, L, c)
  in, float32 out). `impl`: "splash" (TPU), "xla" (GPU) or "cpu" (the tiled
  form); None chooses by `impl_for()` at trace time. `interpret` applies to
  "splash" only.
  """
  impl = impl_for() if impl is None else impl
  if impl == "cpu":
    return block_causal_attention(tuple(patch_nums), scale, dtype, q_NLc,
                                  k_NLc, v_NLc)
  if impl == "splash":
    return splash_attention(patch_nums, scale, dtype, q_NLc, k_NLc, v_NLc,
                            interpret=interpret)
  if impl == "xla":
    return xla_attention(patch_nums, scale, dtype, q_NLc, k_NLc, v_NLc,
                         cudnn=_platform() in ("gpu", "cuda", "rocm"))
  raise ValueError(f"unknown attention impl {impl!r}: expected one of {IMPLS}")
