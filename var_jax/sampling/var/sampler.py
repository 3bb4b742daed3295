"""Class-conditional next-scale sampling: options, the `Sampler`, one call.

`Sampler(vae, var, opts)(labels, seed=...)` runs a batch as two jitted
programs: the scale loop (`loop.run`, the official
`VAR.autoregressive_infer_cfg`; with a drafter, collaborative decoding, CoDe's
`autoregressive_infer_cfg_draft` + `_refine`) and the VQVAE decoder. Options
are checked here, once; everything below takes them as given.

Two choices change the program, never the tokens: `scale_loop` (how the loop
steps over scales, see `loop`) and `layer_loop` (blocks as one `lax.scan`
over stacked weights, or unrolled over one buffer per layer; see
`transformer.with_block_layout`). Unrolled loops compile into larger programs
that run faster; `loops_for` picks by job size and docs/performance.md has
the figures.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.errors import UserError
from var_jax.models.scales import layout
from var_jax.models.var.config import check_compatible
from var_jax.models.var.transformer import (VAR, with_block_layout,
                                            without_training_fields)
from var_jax.models.var.vqvae import VQVAE
from var_jax.sampling.tuning import CpuPlan
from var_jax.sampling.var import loop
from var_jax.sampling.var.options import (  # noqa: F401  (re-exported)
    LAYER_LOOPS, SCALE_LOOPS, SampleOptions, check_seed_value, is_int,
    loops_for)

_BLOCK_LAYOUT = {"unrolled": "list", "scan": "stacked"}
_INT32_MAX = 2 ** 31 - 1


class SampleOut(NamedTuple):
  idx: list  # Token ids per scale, int32 (B, pn*pn) each.
  images_BHWC: jax.Array  # float32 (B, H, W, 3) in [0, 1].
  labels_B: jax.Array  # int32, the classes used (drawn when none were given).


def _scales(var_states, vae_state, table, labels_B, key, ids_B, given_BL,
            keep_BL, *, var_defs, vae_def, opts):
  """The scale loop: (tokens (B, L), final f_hat, labels)."""
  models = [nnx.merge(d, s) for d, s in zip(var_defs, var_states)]
  vae = nnx.merge(vae_def, vae_state)
  cfg = models[-1].cfg
  k_labels, k_tokens = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
  if labels_B is None:
    labels_B = jax.vmap(lambda i: jax.random.randint(
        jax.random.fold_in(k_labels, i), (), 0, cfg.num_classes))(ids_B)
  labels_B = labels_B.astype(jnp.int32)
  edit = None if given_BL is None else (given_BL.astype(jnp.int32), keep_BL)
  state = loop.init_state(cfg.patch_nums, cfg.cvae, ids_B.shape[0])
  contexts = [loop.Context(m, vae.quantize, opts, table, labels_B, ids_B,
                           k_tokens, edit) for m in models]
  k = len(cfg.patch_nums)
  n = k if opts.draft_steps is None else opts.draft_steps
  state, hub = loop.run(contexts[0], range(n), state, opts.scale_loop)
  if len(models) == 2:
    state, _ = loop.run(contexts[1], range(n, k), state, opts.scale_loop, hub)
  return state.tokens_BL, state.f_hat_BHWC, labels_B


def _decode(vae_state, f_hat_BHWC, *, vae_def, batched):
  """float32 images (B, H, W, 3) in [0, 1] from the final f_hat."""
  return loop.decode_images(nnx.merge(vae_def, vae_state), f_hat_BHWC,
                            batched=batched)


def _committed(tree):
  """The weights committed to the device(s) they are on.

  Whether an argument is committed is part of a jitted program's cache key:
  weights restored from a checkpoint are committed, freshly built ones are
  not, and the same model would otherwise compile its sampler twice.
  """
  def commit(x):
    if isinstance(x, jax.ShapeDtypeStruct):  # Abstract: compile-only use.
      return x
    if not isinstance(x, jax.Array):  # Host arrays: onto the default device.
      x = jax.device_put(x)
    return x if x.committed else jax.device_put(x, x.sharding)
  return jax.tree.map(commit, tree)


@functools.lru_cache(maxsize=None)
def _program(part: str, options: tuple):
  """The jitted scale loop or decoder, compiled with XLA `options`.

  Two programs so that each gets the compiler options its tuning chose
  (`tuning.CpuPlan`); the hand-over is the small f_hat.
  """
  if part == "scales":
    return jax.jit(_scales, static_argnames=("var_defs", "vae_def", "opts"),
                   compiler_options=dict(options) or None)
  return jax.jit(_decode, static_argnames=("vae_def", "batched"),
                 compiler_options=dict(options) or None)


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
      drawing scales 0..draft_steps-1; both must share the tokenizer.
    tuning: XLA compiler options and decoder form (`tuning.CpuPlan`, as
      `var-jax tune` measures them); None: XLA's defaults, whole-batch
      decoding.

  The models' blocks are held in the layout `opts.layer_loop` needs (a
  one-time copy when it differs from theirs; the caller's models are not
  changed).

  Raises:
    UserError: inconsistent options (per-scale lists of the wrong length,
      draft_steps without a drafter or outside 1..K-1) or models that do not
      belong together.
  """

  def __init__(self, vae, var, opts: SampleOptions = SampleOptions(), *,
               drafter=None, tuning: CpuPlan | None = None):
    if not isinstance(opts, SampleOptions):
      raise UserError(f"opts must be a SampleOptions, got {opts!r}")
    for name, model, kind in (("vae", vae, VQVAE), ("var", var, VAR),
                              ("drafter", drafter, VAR)):
      if not isinstance(model, kind) and (name != "drafter"
                                          or model is not None):
        raise UserError(f"{name} must be a {kind.__name__} (see "
                        f"var_jax.load), got {type(model).__name__}")
    if (drafter is None) != (opts.draft_steps is None):
      raise UserError("collaborative decoding needs both a drafter model and "
                      "draft_steps" if drafter is None else
                      "a drafter model needs draft_steps (1..K-1)")
    check_compatible(vae.cfg, var.cfg,
                     None if drafter is None else drafter.cfg)
    self.opts = opts
    self.tuning = tuning or CpuPlan()
    self.var_config = var.cfg
    self.patch_nums = tuple(var.cfg.patch_nums)
    self.layout = layout(self.patch_nums)
    self._resolved = opts.resolved(self.layout.num_scales)
    models = (var,) if drafter is None else (drafter, var)
    split = [nnx.split(with_block_layout(without_training_fields(m),
                                         _BLOCK_LAYOUT[opts.layer_loop]))
             for m in models]
    self._var_defs = tuple(d for d, _ in split)
    self.var_states = _committed(tuple(s for _, s in split))
    self._vae_def, vae_state = nnx.split(vae)
    self.vae_state = _committed(vae_state)
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

  def _table(self):
    return loop.scale_table(self.patch_nums, self.opts.cfg,
                            self._resolved.temperature)

  def _scales_program(self):
    return functools.partial(
        _program("scales", self.tuning.transformer_options),
        var_defs=self._var_defs, vae_def=self._vae_def, opts=self._static)

  def _decode_program(self):
    return functools.partial(
        _program("decode", self.tuning.decoder_options),
        vae_def=self._vae_def, batched=self.tuning.decoder_batched)

  def lower(self, batch: int, *, random_labels: bool = False,
            edit: bool = False, sharding=None, batch_sharding=None):
    """AOT-lowers both programs for `batch`: (scale loop, decoder).

    With `sharding` (of the weights and the scale table, e.g. replicated
    over a mesh) and `batch_sharding` (of the per-sample inputs), every
    argument is abstract and carries them: the programs are lowered for
    those devices (also compile-only ones) without touching the weights.
    """
    def spec(shape, dtype, sh=None):
      return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    def placed(tree):
      if sharding is None:
        return tree
      return jax.tree.map(lambda x: spec(x.shape, x.dtype, sharding), tree)

    i32 = spec((batch,), jnp.int32, batch_sharding)
    seq = self.layout.seq_len
    given = spec((batch, seq), jnp.int32, batch_sharding) if edit else None
    keep = spec((batch, seq), bool, batch_sharding) if edit else None
    key = jax.random.key(0) if sharding is None else placed(
        jax.eval_shape(lambda: jax.random.key(0)))
    scales = self._scales_program().func.lower(
        placed(self.var_states), placed(self.vae_state),
        placed(self._table()), None if random_labels else i32, key, i32,
        given, keep, **self._scales_program().keywords)
    side = self.patch_nums[-1]
    f_hat = spec((batch, side, side, self.var_config.cvae), jnp.float32,
                 batch_sharding)
    decoder = self._decode_program().func.lower(
        placed(self.vae_state), f_hat, **self._decode_program().keywords)
    return scales, decoder

  def compile(self, batch: int):
    """AOT-compiles the plain (given labels, no edit) programs for `batch`.

    Returns `run(labels_B, seed, ids_B)` -> (tokens, images, labels), which
    calls the compiled executables directly (benchmarks time compilation
    and execution apart this way); `run.compiled` and `run.decoder` are the
    executables (for `memory_analysis()`).
    """
    scales, decoder = (l.compile() for l in self.lower(batch))

    def run(labels_B, seed, ids_B):
      tokens, f_hat, labels = scales(
          self.var_states, self.vae_state, self._table(),
          jnp.asarray(labels_B, jnp.int32), check_seed(seed),
          jnp.asarray(ids_B, jnp.int32), None, None)
      return tokens, decoder(self.vae_state, f_hat), labels

    run.compiled, run.decoder = scales, decoder
    return run

  def run_arrays(self, labels_B, key, ids_B, given_BL=None, keep_BL=None):
    """The jitted call on checked arrays: (tokens (B, L), images, labels).

    `key` is a `jax.random.key` (see `check_seed`). The arrays may carry
    shardings (e.g. the batch split over a mesh); the programs follow them.
    """
    tokens, f_hat, labels = self._scales_program()(
        self.var_states, self.vae_state, self._table(), labels_B, key, ids_B,
        given_BL, keep_BL)
    return tokens, self._decode_program()(self.vae_state, f_hat), labels

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
      and the labels used.

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
    if not is_int(batch) or batch < 1:
      raise UserError(f"batch must be an integer >= 1, got {batch!r}")
    if not is_int(offset) or not 0 <= offset <= _INT32_MAX - batch:
      raise UserError(f"offset must be an integer in [0, 2**31 - batch), got "
                      f"{offset!r}")
    key = check_seed(seed)
    given_BL, keep_BL = self._check_edit(given, keep, batch)
    ids_B = jnp.arange(offset, offset + batch, dtype=jnp.int32)
    tokens, images, labels = self.run_arrays(labels, key, ids_B, given_BL,
                                             keep_BL)
    return SampleOut(self.layout.split(tokens), images, labels)


def check_seed(seed):
  """A `jax.random.key` from an int seed in [0, 2**32) or a key.

  Raises:
    UserError: another seed (see `options.check_seed_value`).
  """
  if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(
      seed.dtype, jax.dtypes.prng_key):
    return seed
  return jax.random.key(check_seed_value("seed", seed))
