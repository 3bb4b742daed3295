"""The train step and the sampler, compiled for a TPU slice without its chips.

Everything is abstract (`jax.ShapeDtypeStruct`s carrying the run's
shardings), so nothing is allocated: `train_step` lowers exactly the step
`var-jax train` runs (`train_step.make_train_step`: the same sharding rules,
optimizer, loss and donation) and `sampler` the program `var-jax sample`
runs, for the compile-only devices of `topology.devices`, then reads the
compiler's memory and cost analyses.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from var_jax.errors import VarJaxError
from var_jax.models import attention
from var_jax.models.abstract import abstract_split
from var_jax.models.var.config import ModelConfig
from var_jax.models.var.transformer import VAR, with_block_layout
from var_jax.models.var.vqvae import VQVAE
from var_jax.training import flops as flops_lib
from var_jax.training import optimizer as opt_lib
from var_jax.training import sharding
from var_jax.training import state as state_lib
from var_jax.training import train_step as step_lib


class OutOfMemory(VarJaxError, RuntimeError):
  """The program needs more memory per chip than the chip has."""

  def __init__(self, needed: float | None, available: float | None,
               detail: str):
    self.needed, self.available = needed, available
    super().__init__(detail)


@dataclasses.dataclass(frozen=True)
class Compiled:
  """What the compiler says about one program, per chip unless named."""

  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int  # Donated arguments that the outputs reuse.
  flops: float | None  # XLA's count over every chip (loops: once each).
  optimal_seconds: float | None  # The cost model's step time, if it gives one.
  compile_seconds: float

  @property
  def peak_bytes(self) -> int:
    """Live at once: arguments, temporaries and the outputs that do not
    reuse a donated argument's buffer."""
    return (self.argument_bytes + self.temp_bytes + self.output_bytes
            - self.alias_bytes)


# The compiler's two wordings: "... (506.28G) exceeds available HBM
# (95.73G)" and "Used 95.78G of 95.73G hbm".
_OOM = re.compile(r"\(([0-9.]+)([KMGT]?)\)\s*exceeds available HBM\s*"
                  r"\(([0-9.]+)([KMGT]?)\)", re.I)
_OOM_USED = re.compile(r"Used\s+([0-9.]+)([KMGT]?)\s+of\s+([0-9.]+)([KMGT]?)"
                       r"\s+hbm", re.I)
_UNIT = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _oom(err: Exception) -> OutOfMemory | None:
  """The compiler's out-of-memory error as `OutOfMemory`, else None."""
  text = str(err)
  if "RESOURCE_EXHAUSTED" not in text and "HbmOom" not in text:
    return None
  m = _OOM.search(text) or _OOM_USED.search(text)
  first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
  if not m:
    return OutOfMemory(None, None, first[:300])
  need = float(m.group(1)) * _UNIT[m.group(2).upper()]
  have = float(m.group(3)) * _UNIT[m.group(4).upper()]
  return OutOfMemory(need, have, first[:300])


def _analyse(lowered, devices: int) -> Compiled:
  """Compiles `lowered`; memory per chip and the cost analysis."""
  import time  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # XlaRuntimeError; its type is not public.
    oom = _oom(e)
    if oom is None:
      raise
    raise oom from None
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = flops_lib.cost_dict(compiled.cost_analysis())
  flops = cost.get("flops")
  opt = cost.get("optimal_seconds")
  return Compiled(
      argument_bytes=int(mem.argument_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes),
      alias_bytes=int(mem.alias_size_in_bytes),
      # The analysis is of one chip's program (SPMD): all chips do as much.
      flops=None if flops is None else float(flops) * devices,
      optimal_seconds=None if opt is None else float(opt),
      compile_seconds=seconds)


def _abstract(tree, sh):
  """ShapeDtypeStructs of `tree` carrying `sh` (one sharding or a tree)."""
  if not isinstance(sh, jax.sharding.Sharding):
    return sharding.with_shardings(tree, sh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree)


# ------------------------------------------------------------ training
@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """A train step to compile: the model, the batch and the step's options."""

  model: ModelConfig
  global_batch: int
  opts: step_lib.StepOptions
  attention: str | None = None  # None: the platform's (splash on TPU).


def train_step(setup: TrainSetup, mesh) -> Compiled:
  """Compiles the training step of `setup` on `mesh`.

  Raises:
    OutOfMemory: a chip cannot hold the program.
  """
  cfg = setup.model
  tx = opt_lib.make_optimizer(cfg.var)
  spec = state_lib.var_state_spec(cfg.var, tx, mesh)
  vae_def, vae_abs = abstract_split(VQVAE, cfg.vae)
  rep = sharding.replicated(mesh)
  vae_pure = nnx.to_pure_dict(vae_abs)
  vae_sh = jax.tree.map(lambda _: rep, vae_pure)
  step = step_lib.make_train_step(cfg, spec, vae_def, vae_sh, tx, mesh,
                                  setup.opts)
  b, res = setup.global_batch, cfg.vae.resolution
  batch_sh = sharding.batch_sharding(mesh)
  data = ({"tokens": jax.ShapeDtypeStruct((b, cfg.var.seq_len), jnp.int32,
                                          sharding=batch_sh)}
          if setup.opts.tokens else
          {"images": jax.ShapeDtypeStruct((b, res, res, 3), jnp.float32,
                                          sharding=batch_sh)})
  data["labels"] = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh)
  scalar = lambda dt, shape=(): jax.ShapeDtypeStruct(  # noqa: E731
      shape, dt, sharding=rep)
  args = (spec.target, _abstract(vae_pure, vae_sh), data,
          scalar(jnp.float32), scalar(jnp.float32),
          scalar(jnp.float32, (cfg.var.seq_len,)), scalar(jnp.int32),
          scalar(jnp.uint32, (2,)))
  if setup.attention is None:
    lowered = step.lower(*args)
  else:
    with attention.using(setup.attention):
      lowered = step.lower(*args)
  return _analyse(lowered, mesh.devices.size)


def splash_kernel_flops(patch_nums, num_heads: int, head_dim: int,
                        sequences: int) -> float:
  """FLOPs the splash kernels of one train step compute (forward and
  backward), counted from the blocks its mask leaves in: XLA's cost
  analysis does not look inside a custom call.

  Per (sequence, head, computed block): QK^T and PV forward (4 b^2 d), and
  the backward as twice the forward, the convention of the model count.
  """
  mask = attention.splash_mask(tuple(patch_nums))
  b = attention.SPLASH_BLOCK
  nb = mask.shape[0] // b
  blocks = mask.reshape(nb, b, nb, b).any(axis=(1, 3)).sum()
  return 3.0 * 4.0 * b * b * head_dim * float(blocks) * num_heads * sequences


# ------------------------------------------------------------ sampling
def sampler(model: ModelConfig, batch: int, mesh, *, dtype: str,
            scale_loop: str, layer_loop: str) -> Compiled:
  """Compiles the sampling programs (the scale loop and the decoder) for a
  batch split over every device of `mesh` (weights replicated)."""
  from var_jax.sampling.var.options import SampleOptions  # pylint: disable=import-outside-toplevel
  from var_jax.sampling.var.sampler import Sampler  # pylint: disable=import-outside-toplevel
  vae = nnx.eval_shape(lambda: VQVAE(model.vae, rngs=nnx.Rngs(0)))
  layout = "list" if layer_loop == "unrolled" else "stacked"
  var = nnx.eval_shape(lambda: with_block_layout(
      VAR(model.var, rngs=nnx.Rngs(0)), layout))
  opts = SampleOptions(dtype=dtype, scale_loop=scale_loop,
                       layer_loop=layer_loop)
  s = Sampler(vae, var, opts)
  rep = sharding.replicated(mesh)
  rows = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
  with attention.on_mesh(mesh):
    scales_lo, decoder_lo = s.lower(batch, sharding=rep,
                                    batch_sharding=rows)
  n = mesh.devices.size
  a, d = _analyse(scales_lo, n), _analyse(decoder_lo, n)
  flops = (None if a.flops is None or d.flops is None else a.flops + d.flops)
  opt = (None if a.optimal_seconds is None or d.optimal_seconds is None
         else a.optimal_seconds + d.optimal_seconds)
  # The programs run one after the other: the larger peak is the peak.
  big = max((a, d), key=lambda c: c.peak_bytes)
  return dataclasses.replace(big, flops=flops, optimal_seconds=opt,
                             compile_seconds=a.compile_seconds
                             + d.compile_seconds)


def decoder_flops(model: ModelConfig) -> float | None:
  """FLOPs of decoding one image (XLA's count of the decoder on this host;
  the decoder has no loops)."""
  graphdef, state = abstract_split(VQVAE, model.vae)
  side = model.var.patch_nums[-1]
  f = jax.ShapeDtypeStruct((1, side, side, model.vae.z_channels),
                           jnp.float32)
  return flops_lib.xla_flops(
      lambda st, x: nnx.merge(graphdef, st).decode(x),
      nnx.to_pure_dict(state), f)


def sample_model_flops(model: ModelConfig, batch: int) -> float:
  """Analytic FLOPs of the transformer sampling `batch` images with
  guidance (2 rows each): every matmul over the new tokens of each scale,
  attention against the cached prefix, and the vocabulary head."""
  v = model.var
  c, f = v.embed_dim, v.mlp_dim
  total, seen = 0.0, 0
  for pn in v.patch_nums:
    n = pn * pn
    seen += n
    per_layer = 2 * n * (3 * c * c + c * c + 2 * c * f) + 4 * n * seen * c
    total += v.depth * per_layer + 2 * n * c * v.vocab_size
  return float(2 * batch * total)


# ------------------------------------------------------------ Infinity
# The released models `--infinity` names: (transformer, tokenizer).
INFINITY_MODELS = {"2b": ("INFINITY_2B", "BSQ_D32"),
                   "8b": ("INFINITY_8B", "BSQ_D14_PATCHIFY")}


def released_infinity(size: str) -> tuple:
  """(transformer, tokenizer, text encoder) configs of a released model."""
  from var_jax.models.infinity import bsq, config, t5  # pylint: disable=import-outside-toplevel
  inf_name, vae_name = INFINITY_MODELS[size]
  return (getattr(config, inf_name), getattr(bsq, vae_name), t5.FLAN_T5_XL)


def infinity_sampler(cfgs: tuple, batch: int, mesh, *, dtype: str, grids,
                     ratio: float, text_len: int, unroll: bool) -> Compiled:
  """Compiles what `var-jax t2i` runs per batch, for `batch` prompts split
  over every device of `mesh` (weights replicated): the text encoder, then
  the sampler (scales and decoder). Both sets of weights stay on the chips,
  so each program is compiled with the other's weights as an unused
  argument; the record is the program with the larger peak, its FLOPs and
  estimate the two programs' sum. `cfgs`: the (transformer, tokenizer,
  text encoder) configs."""
  from var_jax.models.infinity import bsq, t5  # pylint: disable=import-outside-toplevel
  from var_jax.models.infinity.transformer import Infinity  # pylint: disable=import-outside-toplevel
  from var_jax.sampling.infinity.jobs import text_program  # pylint: disable=import-outside-toplevel
  from var_jax.sampling.infinity.sampler import (  # pylint: disable=import-outside-toplevel
      InfinityOptions, InfinitySampler)
  model, vae, text = (nnx.merge(*abstract_split(ctor, cfg)) for ctor, cfg in
                      zip((Infinity, bsq.BSQVAE, t5.T5Encoder), cfgs))
  rep = sharding.replicated(mesh)
  rows = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
  s = InfinitySampler(model, vae, InfinityOptions(dtype=dtype),
                      unroll_blocks=unroll)
  encode, t5_state = text_program(text, dtype)
  t5_abs, inf_abs = _abstract(t5_state, rep), _abstract(s.state, rep)
  n = mesh.devices.size
  a = _analyse(s.lower(batch, text_len, grids=grids, ratio=ratio,
                       sharding=rep, batch_sharding=rows, resident=t5_abs),
               n)
  ids = jax.ShapeDtypeStruct((batch, text_len), jnp.int32, sharding=rows)
  with_sampler = jax.jit(lambda _, *args: encode(*args), keep_unused=True)
  t = _analyse(with_sampler.lower(inf_abs, t5_abs, ids, ids), n)
  total = lambda f: None if f(a) is None or f(t) is None else f(a) + f(t)  # noqa: E731
  return dataclasses.replace(
      max((a, t), key=lambda c: c.peak_bytes),
      flops=total(lambda c: c.flops),
      optimal_seconds=total(lambda c: c.optimal_seconds),
      compile_seconds=a.compile_seconds + t.compile_seconds)


def infinity_model_flops(cfg, batch: int, grids, text_len: int,
                         guided: bool = True) -> float:
  """Analytic FLOPs of the transformer drawing `batch` images (twice the
  rows with guidance): per scale and block, every matmul over the scale's
  new tokens, self-attention against all tokens so far, cross-attention
  over the text (its keys and values projected again at every scale, as
  the model does), and the head. `cfg`: the transformer's config."""
  c, f, t = cfg.embed_dim, cfg.mlp_dim, text_len
  total, seen = 0.0, 0
  for h, w in grids:
    n = h * w
    seen += n
    per_block = (2 * n * (6 * c * c + 2 * c * f) + 2 * t * c * 2 * c
                 + 4 * n * seen * c + 4 * n * t * c)
    total += cfg.depth * per_block + 2 * n * c * cfg.logits_per_token
  return float((2 if guided else 1) * batch * total)


def infinity_decoder_flops(cfg, grids) -> float | None:
  """FLOPs of decoding one image with the tokenizer of config `cfg` (XLA's
  count on this host)."""
  from var_jax.models.infinity import bsq  # pylint: disable=import-outside-toplevel
  graphdef, state = abstract_split(bsq.BSQVAE, cfg)
  h, w = grids[-1]
  k = 2 if cfg.spatial_patchify else 1
  f = jax.ShapeDtypeStruct((1, k * h, k * w, cfg.codebook_dim), jnp.float32)
  return flops_lib.xla_flops(
      lambda st, x: nnx.merge(graphdef, st).decode(x),
      nnx.to_pure_dict(state), f)
