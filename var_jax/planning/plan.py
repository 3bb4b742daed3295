"""Plans: one compiled program for one slice, as a record and a table.

`plan_training` compiles the train step as it runs (memory per chip), and
for `flops_per_step` twice more with its layer and micro-batch loops
unrolled, because XLA's cost analysis counts a loop body once (see
`_counted_flops`). The splash kernel is a
custom call the analysis does not see into: its FLOPs are added from its
block mask and the record says so (`flops_source`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata

import jax
from flax import nnx

from var_jax.errors import UserError
from var_jax.models.abstract import abstract_split
from var_jax.models.var.transformer import VAR
from var_jax.models.var.vqvae import VQVAE
from var_jax.planning import programs, topology
from var_jax.training import flops as flops_lib
from var_jax.training import mesh as mesh_lib
from var_jax.training import sharding
from var_jax.training import train_step as step_lib

GiB = topology.GiB


def _versions() -> dict:
  try:
    libtpu = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    libtpu = None
  return {"jax": jax.__version__, "libtpu": libtpu}


def default_mesh(slice_: topology.Slice, width: int | None = None) -> str:
  """fsdp over the chips of a slice, data across slices; with the model's
  `width`, the most fsdp ways that divide it (a weight whose dimension the
  fsdp ways do not divide stays whole on every chip: d30's 1,920 over 256
  chips would be), the rest of the slice's chips data parallel."""
  n = slice_.chips_per_slice
  fsdp = max(f for f in range(1, n + 1)
             if n % f == 0 and (width is None or width % f == 0))
  return f"data={slice_.slices * (n // fsdp)},fsdp={fsdp}"


def _mesh(slice_, spec, width=None):
  devs = topology.devices(slice_)
  return mesh_lib.make_mesh(spec or default_mesh(slice_, width), devs)


def _estimate(optimal_seconds, model_flops: float, peak_flops: float):
  """(seconds, why null): the cost model's step time if it is usable: a
  positive time in which the chips' peak could do the model's work."""
  if optimal_seconds is None:
    return None, "the compiler gave no optimal_seconds"
  if optimal_seconds <= 0:
    return None, (f"the compiler's optimal_seconds is {optimal_seconds:.3g} "
                  "(not a time)")
  if model_flops / optimal_seconds > peak_flops:
    return None, (f"the cost model's {optimal_seconds:.3g} s would exceed "
                  "the chips' peak FLOP/s (it left work out)")
  return optimal_seconds, None


def _mesh_text(m) -> str:
  return ",".join(f"{k}={v}" for k, v in m.shape.items())


def _record(kind: str, slice_, m, run: programs.Compiled, *,
            examples: int, flops, flops_source, flops_null_reason,
            model_flops: float,
            model_flops_note: str, seconds, why, **fields) -> dict:
  """The JSON record of a plan: what both kinds share, then `fields`.

  `examples` (per step or call) turns the estimated seconds into images/s.
  """
  hbm, peak = slice_.chip.hbm_bytes, slice_.chip.peak_bf16
  rec = {
      "kind": kind, "topology": slice_.name,
      "topology_name": slice_.topology_name, "slices": slice_.slices,
      "chips": slice_.chips, "mesh": _mesh_text(m), **fields,
      "hbm_per_chip_bytes": hbm, "argument_bytes": run.argument_bytes,
      "temp_bytes": run.temp_bytes, "output_bytes": run.output_bytes,
      "alias_bytes": run.alias_bytes, "peak_bytes": run.peak_bytes,
      # The compiler refuses a program a chip cannot hold (the one-line
      # error): one it placed fits, within the compiler's own limit, which
      # on v5p lies a little above the published HBM.
      "fits": True, "peak_over_published_hbm": run.peak_bytes > hbm,
      "flops_per_step": flops, "flops_source": flops_source,
      "flops_null_reason": flops_null_reason,
      "model_flops_per_step": model_flops,
      "model_flops_note": model_flops_note,
      "compiler_seconds": seconds, "compiler_seconds_is_estimate": True,
      "compiler_seconds_null_reason": why,
      "images_per_second": None if seconds is None else examples / seconds,
      "mfu": None if seconds is None
      else model_flops / seconds / (peak * slice_.chips),
      "peak_bf16_per_chip": peak,
      "compile_seconds": run.compile_seconds, **_versions()}
  return rec


def _oom_advice(what: str, slice_, oom: programs.OutOfMemory,
                mesh: str) -> str:
  hbm = slice_.chip.hbm_bytes
  need = (f"needs {oom.needed / GiB:.1f} GiB per chip of "
          f"{(oom.available or hbm) / GiB:.1f} GiB (short by "
          f"{(oom.needed - (oom.available or hbm)) / GiB:.1f} GiB)"
          if oom.needed is not None else f"does not fit: {oom}")
  return f"{what} on {slice_.name} ({mesh}) {need}"


# What --fit tries, in order, until the step fits: (remat, grad_accum factor).
FIT_LADDER = (("none", 1), ("dots", 1), ("block", 1), ("block", 2),
              ("block", 4), ("block", 8))


def _compile_fitting(setups, m, slice_, DoesNotFit):
  """(setup, compiled, [what] of the setups that did not fit) of the first
  setup that fits; the last one's error when none does."""
  tried = []
  for i, (setup, what) in enumerate(setups):
    try:
      return setup, programs.train_step(setup, m), tried
    except programs.OutOfMemory as oom:
      if i + 1 < len(setups):
        tried.append(f"remat {setup.opts.remat}, grad_accum "
                     f"{setup.opts.grad_accum}")
        continue
      opts = setup.opts
      per_chip = setup.global_batch // opts.grad_accum // m.devices.size
      tries = []
      width = setup.model.var.embed_dim
      if (m.shape["fsdp"] < slice_.chips_per_slice
          and width % slice_.chips_per_slice == 0):
        tries.append(f"more fsdp ways (--mesh data={slice_.slices},"
                     f"fsdp={slice_.chips_per_slice})")
      if opts.remat != "block":
        tries.append("--remat block")
      micro = setup.global_batch // (opts.grad_accum * 2)
      if micro and setup.global_batch % (opts.grad_accum * 2) == 0 and (
          micro % m.devices.size == 0):
        tries.append(f"a smaller per-chip batch (now {per_chip}; "
                     f"--grad-accum {opts.grad_accum * 2})")
      else:
        tries.append(f"a slice with more memory per chip (the per-chip "
                     f"batch is {per_chip}, the least the global batch "
                     "allows here)")
      if len(setups) == 1:
        tries.append("--fit (tries remat, then accumulation)")
      raise DoesNotFit(_oom_advice(what, slice_, oom, _mesh_text(m)) + "; try "
                       + ", ".join(tries[:-1]) + (" or " if len(tries) > 1
                                                  else "") + tries[-1]
                       ) from None
  raise AssertionError("no setup to compile")


def _counted_flops(setup, m) -> float | None:
  """FLOPs of the step at its global batch (all chips), or None.

  The step is compiled with its loops unrolled (the cost analysis counts a
  loop body once) at one and at two examples per chip, where it fits
  whatever the batch, and the count is extended linearly to the global
  batch: a step's work is per-example work plus the optimizer's, which does
  not depend on the batch.
  """
  n = m.devices.size
  counts = []
  for per_chip in (1, 2):
    small = dataclasses.replace(
        setup, global_batch=n * per_chip,
        opts=dataclasses.replace(setup.opts, unroll=True, grad_accum=1))
    counts.append(programs.train_step(small, m).flops)
  if None in counts:
    return None
  per_example = (counts[1] - counts[0]) / n
  return counts[0] + (setup.global_batch - n) * per_example


def _check_tokens(batch: int, seq_len: int, flag: str) -> None:
  """Refuses a batch whose token count the compiler's 32-bit sizes cannot
  hold (it aborts on one)."""
  if batch * seq_len >= 2 ** 31:
    raise UserError(f"{flag} {batch}: {batch} x {seq_len} tokens is more "
                    "than a program can index (2^31)")


def plan_training(slice_: topology.Slice, preset: str, *,
                  global_batch: int | None = None,
                  grad_accum: int | None = None, mesh: str | None = None,
                  remat: str | None = None, dtype: str = "bfloat16",
                  attention: str | None = None, count_flops: bool = True,
                  fit: bool = False) -> dict:
  """The record of one train step on `slice_` (see the module docstring).

  `preset` names a training config (bundled or a file); the other
  arguments override its fields. `fit`: try `FIT_LADDER` (remat, then
  gradient accumulation) from the given setting until the step fits.

  Raises:
    UserError: bad arguments; `commands.DoesNotFit` (a UserError) when the
      compiler reports that a chip cannot hold the step.
  """
  from var_jax.planning.commands import DoesNotFit  # pylint: disable=import-outside-toplevel
  from var_jax.training.config import TrainConfig, load_config  # pylint: disable=import-outside-toplevel
  cfg = load_config(preset, TrainConfig)
  kw = {k: v for k, v in (("global_batch", global_batch),
                          ("grad_accum", grad_accum), ("remat", remat),
                          ("dtype", dtype)) if v is not None}
  cfg = dataclasses.replace(cfg, **kw)
  cfg.validate()
  model = cfg.model_config()
  _check_tokens(cfg.global_batch, model.var.seq_len, "--global-batch")
  m = _mesh(slice_, mesh, model.var.embed_dim)
  impl = attention or "splash"
  ladder = [(cfg.remat, 1)]
  if fit:
    start = [r for r, _ in FIT_LADDER].index(cfg.remat)
    ladder += [step for step in FIT_LADDER[start:] if step != (cfg.remat, 1)]
  setups = []
  for remat_i, factor in ladder:
    accum = cfg.grad_accum * factor
    if cfg.global_batch % accum or (cfg.global_batch // accum) % (
        m.devices.size):
      continue
    opts = step_lib.StepOptions(label_smooth=cfg.label_smooth,
                                dtype=cfg.dtype, grad_accum=accum,
                                remat=remat_i)
    setups.append((programs.TrainSetup(model, cfg.global_batch, opts,
                                       None if impl == "splash" else impl),
                   f"{model.name} training at global batch "
                   f"{cfg.global_batch} (grad_accum {accum}, remat {remat_i}"
                   f", {cfg.dtype})"))
  if not setups:
    mesh_lib.check_batch(m, cfg.global_batch, cfg.grad_accum)  # Raises.
  setup, run, tried = _compile_fitting(setups, m, slice_, DoesNotFit)
  var = model.var
  unsplit, _ = sharding.unsplit_weights(abstract_split(VAR, var)[1], m)
  vae_def, vae_abs = abstract_split(VQVAE, model.vae)
  tok = flops_lib.tokenizer_flops(vae_def, nnx.to_pure_dict(vae_abs),
                                  model.vae.resolution) or 0.0
  model_flops = (flops_lib.var_train_flops(var, cfg.global_batch)
                 + tok * cfg.global_batch)
  head_dim = var.embed_dim // var.num_heads
  splash_flops = (programs.splash_kernel_flops(
      var.patch_nums, var.num_heads, head_dim, cfg.global_batch) * var.depth
      if impl == "splash" else 0.0)
  flops = source = None
  if count_flops:
    counted = _counted_flops(setup, m)
    if counted is not None:
      flops = counted + splash_flops
      source = ("XLA cost analysis of the step with its loops unrolled, at "
                "1 and 2 examples per chip, extended linearly to the global "
                "batch" + (" + the splash kernels' FLOPs from their block "
                           "mask" if impl == "splash" else ""))
  # No usable time: the step as compiled loops over its layers (the cost
  # model counts a loop body once), and for the unrolled step on more than
  # one chip the cost model answers -1 (it gives times for the same step on
  # one chip: cross-chip collectives are what it cannot price).
  figure = ("" if run.optimal_seconds is None else
            f" (its figure for the step as compiled: "
            f"{run.optimal_seconds:.3g}" + (" s)" if run.optimal_seconds > 0
                                             else ", not a time)"))
  seconds, why = None, (
      "the cost model counts the layer loop's body once" + figure
      + ("; for the loop-unrolled step on several chips it answers -1 "
         "(cross-chip collectives)" if m.devices.size > 1 and count_flops
         else ""))
  flops_why = None if flops is not None else (
      "not counted (--no-flop-count)" if not count_flops else
      "the loop-unrolled compile gave no count")
  opts = setup.opts
  return _record(
      "train", slice_, m, run,
      examples=cfg.global_batch, flops=flops, flops_source=source,
      flops_null_reason=flops_why,
      model_flops=model_flops,
      model_flops_note="VAR: 6 x params x tokens + attention over the full "
                       "L x L matrix (forward + 2 x backward); tokenizer: "
                       "its forward pass per image (XLA's count on this "
                       "host)",
      seconds=seconds, why=why, preset=model.name,
      global_batch=cfg.global_batch, grad_accum=opts.grad_accum,
      remat=opts.remat, dtype=cfg.dtype, attention=impl,
      unsplit_weight_bytes=unsplit, fit_tried=tried)


def plan_sampling(slice_: topology.Slice, preset: str, *, batch: int,
                  dtype: str = "bfloat16", scale_loop: str = "python",
                  layer_loop: str = "unrolled",
                  mesh: str | None = None) -> dict:
  """The record of sampling `batch` images per call on `slice_` (the batch
  split over every chip, weights replicated)."""
  from var_jax.planning.commands import DoesNotFit  # pylint: disable=import-outside-toplevel
  from var_jax.training.config import TrainConfig, load_config  # pylint: disable=import-outside-toplevel
  model = load_config(preset, TrainConfig).model_config()
  _check_tokens(batch, model.var.seq_len, "--batch")
  m = _mesh(slice_, mesh or f"data={slice_.chips},fsdp=1")
  if batch % m.devices.size:
    raise UserError(f"--batch {batch} does not split over the "
                    f"{m.devices.size} chips of {slice_.name}")
  try:
    run = programs.sampler(model, batch, m, dtype=dtype,
                           scale_loop=scale_loop, layer_loop=layer_loop)
  except programs.OutOfMemory as oom:
    raise DoesNotFit(_oom_advice(
        f"{model.name} sampling at batch {batch}", slice_, oom,
        _mesh_text(m))
        + f"; try a smaller --batch (now {batch // m.devices.size} per "
        "chip)") from None
  model_flops = programs.sample_model_flops(model, batch) + batch * (
      programs.decoder_flops(model) or 0.0)
  seconds, why = _estimate(run.optimal_seconds, model_flops,
                           slice_.chip.peak_bf16 * slice_.chips)
  loops = scale_loop == "scan" or layer_loop == "scan"
  if loops:  # The cost model counts a loop body once.
    seconds, why = None, ("the program loops (scan) and the cost model "
                          "counts a loop body once; --scale-loop python "
                          "--layer-loop unrolled gives an estimate")
  return _record(
      "sample", slice_, m, run,
      examples=batch,
      flops=None if loops else run.flops,
      flops_source=None if loops else "XLA cost analysis",
      flops_null_reason=("the program loops (scan): the cost analysis "
                         "counts a loop body once" if loops else None),
      model_flops=model_flops,
      model_flops_note="transformer and head over every scale's new tokens, "
                       "guidance doubling the rows; the decoder per image "
                       "(XLA's count on this host)",
      seconds=seconds, why=why, preset=model.name, batch=batch, dtype=dtype,
      scale_loop=scale_loop, layer_loop=layer_loop)


def plan_infinity_sampling(slice_: topology.Slice, size: str | tuple, *,
                           batch: int,
                           dtype: str = "bfloat16", resolution: int = 1024,
                           ratio: float = 1.0, text_len: int = 128,
                           unroll: bool = True,
                           mesh: str | None = None) -> dict:
  """The record of `var-jax t2i` drawing `batch` images per call with a
  released Infinity model on `slice_` (the batch split over every chip,
  weights replicated). `size`: a released model ("2b", "8b") or the
  (transformer, tokenizer, text encoder) configs. `unroll`: blocks written
  out, so the compiler counts every one (else a scan, counted once: FLOPs
  and estimate null)."""
  from var_jax.models.infinity import schedules  # pylint: disable=import-outside-toplevel
  from var_jax.planning.commands import DoesNotFit  # pylint: disable=import-outside-toplevel
  m = _mesh(slice_, mesh or f"data={slice_.chips},fsdp=1")
  if batch % m.devices.size:
    raise UserError(f"--batch {batch} does not split over the "
                    f"{m.devices.size} chips of {slice_.name}")
  grids = schedules.schedule(ratio, resolution)
  if isinstance(size, str):
    name, cfgs = f"infinity-{size}", programs.released_infinity(size)
  else:
    name, cfgs = "infinity", size
  try:
    run = programs.infinity_sampler(cfgs, batch, m, dtype=dtype, grids=grids,
                                    ratio=ratio, text_len=text_len,
                                    unroll=unroll)
  except programs.OutOfMemory as oom:
    raise DoesNotFit(_oom_advice(
        f"{name} sampling at batch {batch}", slice_, oom, _mesh_text(m))
        + f"; try a smaller --batch (now {batch // m.devices.size} per "
        "chip)") from None
  model_flops = programs.infinity_model_flops(cfgs[0], batch, grids,
                                             text_len) \
      + batch * (programs.infinity_decoder_flops(cfgs[1], grids) or 0.0)
  seconds, why = _estimate(run.optimal_seconds, model_flops,
                           slice_.chip.peak_bf16 * slice_.chips)
  if not unroll:
    seconds, why = None, ("the blocks run as a scan and the cost model "
                          "counts a loop body once; --layer-loop unrolled "
                          "gives an estimate")
  h, w = schedules.image_size(grids)
  return _record(
      "sample", slice_, m, run, examples=batch,
      flops=run.flops if unroll else None,
      flops_source="XLA cost analysis (text encoder and sampler)"
      if unroll else None,
      flops_null_reason=None if unroll else (
          "the blocks run as a scan: the cost analysis counts a loop body "
          "once"),
      model_flops=model_flops,
      model_flops_note="transformer and head over every scale's new tokens, "
                       "guidance doubling the rows; the decoder per image "
                       "(XLA's count on this host); not the text encoder",
      seconds=seconds, why=why, preset=name, batch=batch, dtype=dtype,
      resolution=f"{h}x{w}", text_length=text_len,
      scale_loop="python", layer_loop="unrolled" if unroll else "scan",
      memory_note="the larger of the two programs (text encoder, sampler), "
                  "each compiled with the other's weights resident")


def _gib(x) -> str:
  return "n/a" if x is None else f"{x / GiB:.2f} GiB"


def _num(x, fmt) -> str:
  return "null" if x is None else format(x, fmt)


def table(rec: dict) -> list[str]:
  """Readable lines of a record (the JSON line follows them)."""
  what = (f"train step, global batch {rec['global_batch']}, grad_accum "
          f"{rec['grad_accum']}, remat {rec['remat']}, attention "
          f"{rec['attention']}" if rec["kind"] == "train" else
          f"sampler, batch {rec['batch']}, {rec['scale_loop']} scale loop, "
          f"{rec['layer_loop']} layer loop")
  if rec.get("resolution"):
    what += (f", {rec['resolution']} px, text {rec['text_length']} tokens "
             "(with the text encoder)")
  ratio = (None if rec["flops_per_step"] is None
           else rec["flops_per_step"] / rec["model_flops_per_step"])
  rows = [
      ("plan", f"{rec['preset']} {what}, {rec['dtype']}"),
      ("slice", f"{rec['topology']} ({rec['topology_name']}, "
                f"{rec['slices']} slice(s), {rec['chips']} chip(s)), mesh "
                f"{rec['mesh']}"),
      ("per chip", f"arguments {_gib(rec['argument_bytes'])}, temporaries "
                   f"{_gib(rec['temp_bytes'])}, outputs "
                   f"{_gib(rec['output_bytes'])} (donated "
                   f"{_gib(rec['alias_bytes'])})"),
      ("peak", f"{_gib(rec['peak_bytes'])} of {_gib(rec['hbm_per_chip_bytes'])}"
               " HBM: fits" + (" (above the published HBM, within the "
                               "compiler's limit)"
                               if rec["peak_over_published_hbm"] else "")),
      ("FLOPs", f"compiled {_num(rec['flops_per_step'], '.3e')}, model "
                f"{rec['model_flops_per_step']:.3e} (ratio "
                f"{_num(ratio, '.2f')})"),
      ("estimate", "compiler cost model (an estimate, not a measurement): "
       + (f"{rec['compiler_seconds']:.4f} s per "
          f"{'step' if rec['kind'] == 'train' else 'call'}, "
          f"{rec['images_per_second']:.1f} images/s, MFU "
          f"{100 * rec['mfu']:.1f}%" if rec["compiler_seconds"] is not None
          else f"none ({rec['compiler_seconds_null_reason']})")),
      ("compiled", f"in {rec['compile_seconds']:.1f} s with jax "
                   f"{rec['jax']}, libtpu {rec['libtpu']}"),
  ]
  if rec.get("fit_tried"):
    rows.insert(1, ("--fit", "did not fit with " + "; ".join(rec["fit_tried"])
                    + f"; fits with remat {rec['remat']}, grad_accum "
                    f"{rec['grad_accum']}"))
  if rec.get("unsplit_weight_bytes"):
    n = rec["unsplit_weight_bytes"]
    amount = _gib(n) if n >= 2 ** 27 else f"{n / 2 ** 20:.1f} MiB"
    rows.insert(3, ("warning", f"{amount} of weights (and their AdamW "
                    "moments, twice that) stay whole on every chip: the "
                    "mesh's fsdp ways do not divide the model width"))
  width = max(len(k) for k, _ in rows)
  return [f"{k:<{width}}  {v}" for k, v in rows]
