"""Class-conditional next-scale sampling with classifier-free guidance.

`Sampler` runs a whole batch as one jitted program: the scale loop with its
KV cache (`var_jax.sampling.var.loop`), optionally split between two models
(collaborative decoding, `var_jax.sampling.var.code`), and the VQVAE decoder.
It corresponds to the official `VAR.autoregressive_infer_cfg`
(FoundationVision VAR `models/var.py`) with `sample_with_top_k_top_p_`
(`models/helpers.py`) as its filter, and, with a drafter, to CoDe's
`autoregressive_infer_cfg_draft` + `autoregressive_infer_cfg_refine`
(czg1225/CoDe `models/var.py`).

Either form of the scale loop (`SampleOptions.form`) applies the blocks as a
scan over the stacked layer weights or as a Python loop over per-layer
copies (`SampleOptions.layer_loop`).

Randomness is a pure function of (seed, scale, global sample index, token
position): the same seed gives the same images for any batch split, either
form, and (for the scales it draws) either model of a collaborative pair.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.models.var.config import COMPUTE_DTYPES
from var_jax.errors import UserError
from var_jax.models.scales import layout
from var_jax.models.var.transformer import KVCache
from var_jax.sampling.var import code, loop
from var_jax.sampling import cpu_plan
from var_jax.sampling.cpu_plan import CpuPlan

FORMS = ("unrolled", "scan")
DEFAULT_FORM = "unrolled"  # Faster on CPU (see README / bench figures).
LAYER_LOOPS = ("scan", "unrolled")
DEFAULT_LAYER_LOOP = "unrolled"  # Faster on CPU (see README / bench figures).
# Jobs of at most this many compiled calls get the scan layer loop from
# `layer_loop_for`. Its program is a tenth of the unrolled one: on a 2-core
# Xeon (d16) it compiles in half the time and loads from the compilation
# cache in 1 s instead of 10, so two images arrive 18 s sooner; each call
# then pays for copying every layer's weights out of the stack at every
# scale (1.5 s per call there). See README, "Time to first image".
SCAN_LAYER_LOOP_MAX_CALLS = 8
# Seeds the sampler distinguishes: jax.random.key keeps 32 bits of a seed.
SEED_LIMIT = 2 ** 32
_INT32_MAX = 2 ** 31 - 1


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _per_scale(name, value, check):
  """A scalar or a sequence of values, each passed through `check`."""
  if isinstance(value, (str, bytes)):
    raise UserError(f"{name} must be a number or a list of numbers, got "
                    f"{value!r}")
  if isinstance(value, Sequence) or isinstance(value, np.ndarray):
    vals = tuple(check(name, v) for v in np.asarray(value).reshape(-1).tolist())
    if not vals:
      raise UserError(f"{name} must not be an empty list")
    return vals
  return check(name, value)


def _check_top_k(name, v):
  if not _is_int(v) or v < 0:
    raise UserError(f"{name} must be an integer >= 0 (0 = off), got {v!r}")
  return int(v)


def _check_top_p(name, v):
  if not _is_real(v) or not 0 <= v <= 1:  # NaN fails the comparison too.
    raise UserError(f"{name} must be a number in [0, 1] (0 = off), got "
                    f"{v!r}")
  return float(v)


def _check_temperature(name, v):
  if not _is_real(v) or not math.isfinite(v) or v <= 0:
    raise UserError(f"{name} must be a finite number > 0, got {v!r}")
  return float(v)


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """Sampling settings; each distinct static value compiles once.

  Attributes:
    cfg: classifier-free guidance scale (finite); scale si mixes
      `(1 + t) cond - t uncond` with `t = cfg * si / (K - 1)`. Data, not
      compiled in.
    top_k: keep the k most likely tokens (0 = off); one int for every
      scale or one per scale.
    top_p: nucleus mass in [0, 1] (0 = off); scalar or per scale.
    temperature: > 0, divides the logits after top-k/top-p filtering, just
      before the draw (CoDe's reference; the keep set is decided on the
      untempered logits); scalar or per scale. Data, not compiled in.
    cfg_until: from this scale index on (0..K), the null-class rows are
      dropped and the scales run B rows instead of 2B, i.e. without
      guidance. None (or K) keeps guidance to the end.
    draft_steps: collaborative decoding: the drafter draws scales
      0..N-1, the refiner the rest (1..K-1; needs `Sampler(drafter=...)`).
    more_smooth: Gumbel-softmax smoothing of the code vectors (for viewing,
      not for FID), as the official `more_smooth`.
    dtype: transformer matmul compute dtype, "float32" or "bfloat16".
    form: scale loop "unrolled" (default) or "scan" (see `loop`); collaborative
      decoding and `cfg_until` need "unrolled".
    layer_loop: "scan": blocks applied by a scan over the stacked layer
      parameters (one block compiled per scale); "unrolled": a Python loop
      over per-layer copies of the block weights (compiles depth times more
      code, avoids copying each layer's weights out of the stack at every
      scale).
    collect_logits: also return the guided logits (tests).

  Raises:
    UserError: a value outside its domain, naming it.
  """

  cfg: float = 1.5
  top_k: int | tuple[int, ...] = 900
  top_p: float | tuple[float, ...] = 0.96
  temperature: float | tuple[float, ...] = 1.0
  cfg_until: int | None = None
  draft_steps: int | None = None
  more_smooth: bool = False
  dtype: str = "float32"
  form: str = DEFAULT_FORM
  layer_loop: str = DEFAULT_LAYER_LOOP
  collect_logits: bool = False

  def __post_init__(self):
    if self.form not in FORMS:
      raise UserError(f"form must be one of {FORMS}, got {self.form!r}")
    if self.layer_loop not in LAYER_LOOPS:
      raise UserError(f"layer_loop must be one of {LAYER_LOOPS}, "
                      f"got {self.layer_loop!r}")
    if self.dtype not in COMPUTE_DTYPES:
      raise UserError(f"dtype must be one of {COMPUTE_DTYPES}, got "
                      f"{self.dtype!r}")
    if not _is_real(self.cfg) or not math.isfinite(self.cfg):
      raise UserError(f"cfg must be a finite number, got {self.cfg!r}")
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("cfg", float(self.cfg))
    set_("top_k", _per_scale("top_k", self.top_k, _check_top_k))
    set_("top_p", _per_scale("top_p", self.top_p, _check_top_p))
    set_("temperature", _per_scale("temperature", self.temperature,
                                   _check_temperature))
    if self.cfg_until is not None and (not _is_int(self.cfg_until)
                                       or self.cfg_until < 0):
      raise UserError(f"cfg_until must be a scale index >= 0, got "
                      f"{self.cfg_until!r}")
    if self.draft_steps is not None and (not _is_int(self.draft_steps)
                                         or self.draft_steps < 1):
      raise UserError(f"draft_steps must be an integer >= 1, got "
                      f"{self.draft_steps!r}")

  def resolved(self, num_scales: int) -> "SampleOptions":
    """These options with every schedule spelled out for `num_scales` scales.

    top_k, top_p, temperature become K-tuples, cfg_until an int in [0, K].

    Raises:
      UserError: a per-scale list of another length, cfg_until > K, or
        draft_steps outside 1..K-1.
    """
    k = num_scales

    def spell(name):
      v = getattr(self, name)
      if not isinstance(v, tuple):
        return (v,) * k
      if len(v) != k:
        raise UserError(f"{name} has {len(v)} values but the model has {k} "
                        f"scales (give one value or one per scale)")
      return v

    until = k if self.cfg_until is None else self.cfg_until
    if until > k:
      raise UserError(f"cfg_until must be in [0, {k}] (the model has {k} "
                      f"scales), got {until}")
    if self.draft_steps is not None and not 1 <= self.draft_steps <= k - 1:
      raise UserError(f"draft_steps must be in [1, {k - 1}] (the model has "
                      f"{k} scales), got {self.draft_steps}")
    return dataclasses.replace(self, top_k=spell("top_k"),
                               top_p=spell("top_p"),
                               temperature=spell("temperature"),
                               cfg_until=until)


class SampleOut(NamedTuple):
  idx: list  # Token ids per scale, int32 (B, pn*pn) each.
  images_BHWC: jax.Array  # float32 (B, H, W, 3) in [0, 1].
  labels_B: jax.Array  # int32, the classes used (drawn when none were given).
  logits: list | None  # Guided logits per scale (B, pn*pn, V) if collected.


# Block matrices, stored (in, out), that the unrolled layer loop keeps
# transposed: XLA folds the transpose back into the dot, which then reads
# the weights as (out, in) rows (torch's nn.Linear layout). Measured on an
# Intel Xeon with XLA's default CPU library: 1.1-1.7x the matmul rate at
# 32-512 rows (the small and middle scales), 1.3x the transformer at batch 1.
_TRANSPOSED = ("mat_qkv", "proj_w", "fc1_w", "fc2_w")


def _transposed(path, a):
  """`a.T` for the leaves of `_TRANSPOSED` (any pytree path naming them)."""
  names = {str(getattr(k, "key", "")) for k in path}
  return a.T if names & set(_TRANSPOSED) else a


def _split_var(var, layer_loop):
  """(graphdef, state) for `_scales`.

  For the unrolled layer loop the state is (rest, per-layer block states):
  every layer's weights become separate buffers, a one-time copy of the
  blocks (the caller's model keeps its stacked arrays), with the matrices
  in `_TRANSPOSED` stored transposed.
  """
  if layer_loop == "scan":
    return nnx.split(var)
  var_def, blocks, rest = nnx.split(var, nnx.PathContains("blocks"), ...)
  layers = [jax.tree_util.tree_map_with_path(
      lambda path, a, i=i: _transposed(path, a[i]), blocks)
            for i in range(var.cfg.depth)]
  return var_def, (rest, layers)


def _merge_var(var_def, var_state):
  """Inverse of `_split_var`: (model, per-layer parameter dicts or None)."""
  if not isinstance(var_state, tuple):
    return nnx.merge(var_def, var_state), None
  rest, stored = var_state
  # Undo the storage transpose inside the program (XLA folds it into the
  # dots); the math is the model's own.
  layers = [jax.tree_util.tree_map_with_path(_transposed, st) for st in stored]
  # The stacked blocks exist only to rebuild the module; the sampler never
  # reads them (it gets `layers`), so XLA drops the stacking as dead code.
  blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  var = nnx.merge(var_def, blocks, rest)
  return var, [nnx.to_pure_dict(st)["blocks"] for st in layers]


def _scales(var_states, vae_state, table, labels_B, key, ids_B, given_BL,
            keep_BL, *, var_defs, vae_def, opts):
  """The scale loop: (tokens (B, L), f_hat, labels, logits or None)."""
  models = [_merge_var(d, s) for d, s in zip(var_defs, var_states)]
  vae = nnx.merge(vae_def, vae_state)
  var, layers = models[-1]
  vcfg = var.cfg
  batch = ids_B.shape[0]
  k_labels, k_tokens = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
  if labels_B is None:
    labels_B = jax.vmap(lambda i: jax.random.randint(
        jax.random.fold_in(k_labels, i), (), 0, vcfg.num_classes))(ids_B)
  labels_B = labels_B.astype(jnp.int32)
  edit = None if given_BL is None else (given_BL.astype(jnp.int32), keep_BL)
  quant = vae.quantize
  if opts.form == "scan":
    cache = KVCache.zeros(vcfg, 2 * batch, jnp.dtype(opts.dtype))
    state = loop.init_state(opts, vcfg.patch_nums, vcfg.cvae, vcfg.vocab_size,
                            k_tokens, batch, cache)
    state = loop.run_scan(var, layers, quant, opts, table, labels_B, state,
                          ids_B, edit)
  else:
    state = loop.init_state(opts, vcfg.patch_nums, vcfg.cvae, vcfg.vocab_size,
                            k_tokens, batch)
    if len(models) == 2:
      state = code.run_collaborative(models[0], models[1], quant, opts, table,
                                     labels_B, state, ids_B, edit)
    else:
      state, _ = loop.run_unrolled(var, layers, quant, opts, table, labels_B,
                                   state, range(len(vcfg.patch_nums)), ids_B,
                                   edit)
  return state.tokens_BL, state.f_hat_BHWC, labels_B, state.logits_BLV


def _decode(vae_state, f_hat_BHWC, *, vae_def, batched):
  """float32 images (B, H, W, 3) in [0, 1] from the final f_hat."""
  return loop.decode_images(nnx.merge(vae_def, vae_state), f_hat_BHWC,
                            batched=batched)


@functools.lru_cache(maxsize=None)
def _program(part: str, options: tuple):
  """The jitted scale loop or decoder, compiled with XLA `options`.

  Two programs instead of one so that each gets the compiler options its
  plan chose (`cpu_plan.CpuPlan`); the hand-over is the small f_hat.
  """
  if part == "scales":
    return jax.jit(_scales, static_argnames=("var_defs", "vae_def", "opts"),
                   compiler_options=dict(options) or None)
  return jax.jit(_decode, static_argnames=("vae_def", "batched"),
                 compiler_options=dict(options) or None)


def layer_loop_for(num_calls: int) -> str:
  """The layer loop that finishes a job of `num_calls` sampler calls sooner.

  "scan" for at most `SCAN_LAYER_LOOP_MAX_CALLS` calls (a short job is
  dominated by compiling or loading the program), "unrolled" (the faster
  program per call) for longer jobs.
  """
  return "scan" if num_calls <= SCAN_LAYER_LOOP_MAX_CALLS else "unrolled"


def check_seed(seed):
  """Returns a `jax.random.key` for an int seed in [0, 2**32) or a key.

  Raises:
    UserError: another seed (jax.random.key keeps only 32 bits of an int,
      so larger or negative seeds would silently repeat others).
  """
  if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(
      seed.dtype, jax.dtypes.prng_key):
    return seed
  if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
    raise UserError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  return jax.random.key(int(seed))


class Sampler:
  """Sampling for one (VQVAE, VAR) pair, or a drafter/refiner pair.

  Calls with equal shapes, models of equal structure and equal static
  options reuse one compiled program; `cfg` and `temperature` enter as data.

  Args:
    vae: the VQVAE (tokenizer and decoder).
    var: the VAR transformer; with `drafter`, the refiner that draws scales
      draft_steps..K-1.
    opts: `SampleOptions`.
    drafter: collaborative decoding's drafter (e.g. d30 for a d16 refiner),
      drawing scales 0..draft_steps-1. Both must share the tokenizer (checked
      here: scale list, vocabulary, code width, class count; the CLI also
      compares the VQVAE weights, see `code.check_same_tokenizer`).
    cpu_plan: compiler options and decoder form (`cpu_plan.CpuPlan`); None
      (default) takes `cpu_plan.plan_for` this machine, per batch size
      class, on first use (measured once per CPU and cached; XLA's defaults
      off the CPU).

  Raises:
    UserError: inconsistent options (per-scale lists of the wrong length,
      draft_steps without a drafter or outside 1..K-1, a pair or cfg_until
      with form="scan") or models that do not belong together.
  """

  def __init__(self, vae, var, opts: SampleOptions = SampleOptions(), *,
               drafter=None, cpu_plan: CpuPlan | None = None):
    self.opts = opts
    self._fixed_plan = cpu_plan
    self._plans = {}
    widest = var if drafter is None else max(
        (var, drafter), key=lambda m: m.cfg.embed_dim)
    self._plan_key = (widest.cfg.embed_dim, opts.dtype, vae.cfg.ch,
                      var.cfg.patch_nums[-1] * vae.cfg.downsample)
    self.var_config = var.cfg
    self.patch_nums = tuple(var.cfg.patch_nums)
    self.layout = layout(self.patch_nums)
    k = self.layout.num_scales
    self._resolved = opts.resolved(k)
    if (drafter is None) != (opts.draft_steps is None):
      raise UserError("collaborative decoding needs both a drafter model and "
                      "draft_steps" if drafter is None else
                      "a drafter model needs draft_steps (1..K-1)")
    if drafter is not None:
      code.check_pair(drafter.cfg, var.cfg, vae.cfg)
    if opts.form == "scan" and (drafter is not None
                                or self._resolved.cfg_until < k):
      raise UserError("collaborative decoding and cfg_until need "
                      "form='unrolled'")
    models = (var,) if drafter is None else (drafter, var)
    split = [_split_var(m, opts.layer_loop) for m in models]
    self._var_defs = tuple(d for d, _ in split)
    self.var_states = tuple(s for _, s in split)
    self._vae_def, self.vae_state = nnx.split(vae)
    # Data (cfg, temperature) stays out of the static options.
    self._static = dataclasses.replace(self._resolved, cfg=0.0,
                                       temperature=1.0)

  @property
  def num_classes(self) -> int:
    return self.var_config.num_classes

  def device_put(self, sharding) -> None:
    """Moves every weight to `sharding` (e.g. replicated over a mesh)."""
    self.var_states = jax.device_put(self.var_states, sharding)
    self.vae_state = jax.device_put(self.vae_state, sharding)

  def plan(self, batch: int) -> CpuPlan:
    """The `CpuPlan` calls of `batch` images use (measured on first use)."""
    if self._fixed_plan is not None:
      return self._fixed_plan
    kind = 1 if batch == 1 else 2
    if kind not in self._plans:
      self._plans[kind] = cpu_plan.plan_for(*self._plan_key, batch=kind)
    return self._plans[kind]

  def _args(self, labels_B, seed, ids_B, given_BL, keep_BL):
    key = check_seed(seed)
    kw = dict(var_defs=self._var_defs, vae_def=self._vae_def,
              opts=self._static)
    table = loop.scale_table(self.patch_nums, self.opts.cfg,
                             self._resolved.temperature)
    return (self.var_states, self.vae_state, table, labels_B, key, ids_B,
            given_BL, keep_BL), kw

  def lower(self, batch: int, *, random_labels: bool = False,
            edit: bool = False):
    """AOT-lowers both programs for `batch`: (scale loop, decoder)."""
    i32 = jax.ShapeDtypeStruct((batch,), jnp.int32)
    seq = self.layout.seq_len
    given = jax.ShapeDtypeStruct((batch, seq), jnp.int32) if edit else None
    keep = jax.ShapeDtypeStruct((batch, seq), bool) if edit else None
    args, kw = self._args(None if random_labels else i32, 0, i32, given, keep)
    plan = self.plan(batch)
    scales = _program("scales", plan.transformer_options).lower(*args, **kw)
    side = self.patch_nums[-1]
    f_hat = jax.ShapeDtypeStruct((batch, side, side, self.var_config.cvae),
                                 jnp.float32)
    decoder = _program("decode", plan.decoder_options).lower(
        self.vae_state, f_hat, vae_def=self._vae_def,
        batched=plan.decoder_batched)
    return scales, decoder

  def compile(self, batch: int):
    """AOT-compiles the plain (given labels, no edit) programs for `batch`.

    Returns `run(labels_B, seed, ids_B)` -> the `run_arrays` outputs, which
    calls the compiled executables directly (benchmarks time compilation and
    execution separately this way); `run.compiled` and `run.decoder` are the
    scale loop's and the decoder's executables (for `memory_analysis()`),
    `run.plan` the `CpuPlan` used.
    """
    scales, decoder = (l.compile() for l in self.lower(batch))

    def run(labels_B, seed, ids_B):
      args, _ = self._args(jnp.asarray(labels_B, jnp.int32), seed,
                           jnp.asarray(ids_B, jnp.int32), None, None)
      tokens, f_hat, labels, logits = scales(*args)
      return tokens, decoder(self.vae_state, f_hat), labels, logits

    run.compiled, run.decoder, run.plan = scales, decoder, self.plan(batch)
    return run

  def run_arrays(self, labels_B, seed, ids_B, given_BL=None, keep_BL=None):
    """Raw jitted call: (tokens (B, L), images, labels, logits or None).

    Unlike `__call__` the arrays are not checked (only the seed). They may
    carry shardings (e.g. the batch split over a mesh); the programs follow
    them.
    """
    args, kw = self._args(labels_B, seed, ids_B, given_BL, keep_BL)
    plan = self.plan(ids_B.shape[0])
    tokens, f_hat, labels, logits = _program(
        "scales", plan.transformer_options)(*args, **kw)
    images = _program("decode", plan.decoder_options)(
        self.vae_state, f_hat, vae_def=self._vae_def,
        batched=plan.decoder_batched)
    return tokens, images, labels, logits

  def check_labels(self, labels, *, allow_null: bool = False) -> np.ndarray:
    """int32 (B,) labels, checked: a non-empty list of class ids.

    Raises:
      UserError: an empty list, non-integers, or a label outside
        [0, num_classes) (or [0, num_classes] with `allow_null`: the null
        class num_classes means unconditional).
    """
    arr = np.asarray(labels)
    if arr.size == 0:
      raise UserError("labels must not be empty (pass batch= for random "
                      "classes)")
    if arr.ndim > 1 or not (np.issubdtype(arr.dtype, np.integer)):
      raise UserError(f"labels must be a list of integer class ids, got "
                      f"{labels!r}")
    arr = arr.reshape(-1)
    top = self.num_classes + (1 if allow_null else 0)
    bad = arr[(arr < 0) | (arr >= top)]
    if bad.size:
      hint = (f" ({self.num_classes} = null class, unconditional)"
              if allow_null else
              f" (the null class {self.num_classes} needs allow_null=True)")
      raise UserError(f"label {int(bad[0])} is outside [0, {top}){hint}")
    return arr.astype(np.int32)

  def _check_edit(self, given, keep, batch):
    if (given is None) != (keep is None):
      raise UserError("given and keep go together (per-scale lists)")
    if given is None:
      return None, None
    k, vocab = self.layout.num_scales, self.var_config.vocab_size
    if len(given) != k or len(keep) != k:
      raise UserError(f"given and keep must hold {k} arrays (one per scale), "
                      f"got {len(given)} and {len(keep)}")
    given = [np.asarray(g) for g in given]
    keep = [np.asarray(m) for m in keep]
    for si, (g, m, n) in enumerate(zip(given, keep, self.layout.lengths)):
      if g.shape != (batch, n) or m.shape != (batch, n):
        raise UserError(f"scale {si}: given and keep must be ({batch}, {n}), "
                        f"got {g.shape} and {m.shape}")
      if not np.issubdtype(g.dtype, np.integer) or m.dtype != bool:
        raise UserError(f"scale {si}: given must be integer ids and keep "
                        f"bool, got {g.dtype} and {m.dtype}")
      if g.size and (g.min() < 0 or g.max() >= vocab):
        raise UserError(f"scale {si}: given token ids must be in [0, "
                        f"{vocab})")
    return (jnp.asarray(self.layout.join(given), jnp.int32),
            jnp.asarray(self.layout.join(keep)))

  def __call__(self, labels=None, *, batch: int | None = None, seed: int = 0,
               offset: int = 0, given=None, keep=None,
               allow_null: bool = False) -> SampleOut:
    """Samples one batch (the official `autoregressive_infer_cfg`).

    Args:
      labels: int class ids (B,) in [0, num_classes). None draws uniform
        random classes per sample (then pass `batch`).
      batch: the batch size when `labels` is None.
      seed: int in [0, 2**32); with `offset` it fixes every sample.
      offset: global index (>= 0) of this batch's first sample, so that a run
        split into batches gives the same samples as one big batch.
      given: zero-shot edits: token ids per scale, K int arrays (B, pn*pn).
      keep: with `given`, K bool arrays (B, pn*pn), True where the given
        token's code is kept instead of the drawn one.
      allow_null: accept the null class `num_classes` in `labels`
        (unconditional samples).

    Returns:
      `SampleOut`: ids per scale, float32 images (B, H, W, 3) in [0, 1],
      the labels used, and the guided logits per scale if collected.

    Raises:
      UserError: bad labels, batch, seed, offset, given or keep.
    """
    if labels is not None:
      labels = self.check_labels(labels, allow_null=allow_null)
      if batch is not None and batch != labels.shape[0]:
        raise UserError(f"batch={batch} but {labels.shape[0]} labels given")
      batch = labels.shape[0]
      labels = jnp.asarray(labels)
    if batch is None:
      raise UserError("pass labels or batch")
    if not _is_int(batch) or batch < 1:
      raise UserError(f"batch must be an integer >= 1, got {batch!r}")
    if not _is_int(offset) or not 0 <= offset <= _INT32_MAX - batch:
      raise UserError(f"offset must be an integer in [0, 2**31 - batch), got "
                      f"{offset!r}")
    check_seed(seed)
    given_BL, keep_BL = self._check_edit(given, keep, batch)
    ids_B = jnp.arange(offset, offset + batch, dtype=jnp.int32)
    tokens, images, labels, logits = self.run_arrays(labels, seed, ids_B,
                                                     given_BL, keep_BL)
    return SampleOut(self.layout.split(tokens), images, labels,
                     self.layout.split(logits))


def sample(vae, var, labels=None, *, batch=None, seed=0, offset=0,
           opts: SampleOptions = SampleOptions(), drafter=None,
           allow_null: bool = False) -> SampleOut:
  """One-shot convenience wrapper around `Sampler` (same arguments)."""
  return Sampler(vae, var, opts, drafter=drafter)(
      labels, batch=batch, seed=seed, offset=offset, allow_null=allow_null)
