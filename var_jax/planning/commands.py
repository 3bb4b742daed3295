"""`var-jax plan`: what fits on a TPU slice, compiled on a machine without one.

The train step (or, with --sample, the sampler) is compiled by the TPU
compiler (libtpu) for the slice's compile-only devices; the command prints
a table and one JSON line: memory per chip against HBM, compiled and model
FLOPs, and the compiler's own step-time estimate where it gives one.
"""

from __future__ import annotations

import json

from var_jax.errors import UserError
from var_jax.models.var.config import COMPUTE_DTYPES, REMAT_CHOICES
from var_jax.planning import topology



class DoesNotFit(UserError):
  """The program needs more memory per chip than the slice's chips have."""

  exit_code = 1


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "plan", help="compile the train step or sampler for a TPU slice (no "
      "TPU needed): memory per chip, FLOPs, the compiler's estimate",
      description="Compiles, with the TPU compiler (libtpu: pip install "
      "'.[tpu]' in the checkout), exactly the step `var-jax train` runs (or "
      "with "
      "--sample the sampler) for a TPU slice, on any machine. Prints a "
      "table and one JSON line; exits 1 when the program does not fit.")
  p.add_argument("--topology", required=True,
                 help="the slice, as Cloud names it (v4-32, v5e-256, "
                 "v5p-128, v6e-64: v4 and v5p count TensorCores, two per "
                 "chip) or GEN:AxB[xC] (v5e:2x4)")
  p.add_argument("--slices", type=int, default=1,
                 help="slices joined over the data-center network (data "
                 "parallel across them)")
  p.add_argument("--preset", "--config", dest="preset",
                 help="a training config, as `train --config` takes it: "
                 "bundled name (d16..d36, tiny, digits) or a config file; "
                 "its model and recipe are used (default d16)")
  p.add_argument("--global-batch", type=int,
                 help="examples per step (default: the config's)")
  p.add_argument("--grad-accum", type=int,
                 help="micro-batches per step (default: the config's)")
  p.add_argument("--mesh", help="data=D,fsdp=F over all chips (default: "
                 "fsdp over the most chips of a slice that divide the model "
                 "width, data over the rest and across slices)")
  p.add_argument("--remat", choices=REMAT_CHOICES,
                 help="what the backward pass recomputes (default: the "
                 "config's)")
  p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="bfloat16",
                 help="matmul compute dtype (weights stay float32)")
  p.add_argument("--attention", choices=("splash", "xla"),
                 help="training attention (default: splash, the TPU's)")
  p.add_argument("--no-flop-count", action="store_true",
                 help="skip the loop-unrolled compiles (at 1 and 2 examples "
                 "per chip) that count the step's FLOPs (flops_per_step is "
                 "then null)")
  p.add_argument("--fit", action="store_true",
                 help="if the step does not fit, try remat dots, then block, "
                 "then 2, 4, 8 times the gradient accumulation, and report "
                 "the first that fits")
  p.add_argument("--sample", action="store_true",
                 help="plan the sampler instead of the train step")
  p.add_argument("--batch", type=int,
                 help="with --sample: images per call over the slice "
                 "(default 64)")
  p.add_argument("--scale-loop", choices=("python", "scan"),
                 help="with --sample: the scale driver (default python; "
                 "scan: the compiler's estimates are then null, a loop "
                 "body being counted once)")
  p.add_argument("--layer-loop", choices=("unrolled", "scan"),
                 help="with --sample: the layer loop (default unrolled)")
  p.add_argument("--infinity", choices=("2b", "8b"),
                 help="with --sample: plan `var-jax t2i` with a released "
                 "Infinity model (text encoder and sampler) instead of VAR")
  p.add_argument("--resolution", type=int, choices=(256, 512, 1024),
                 help="with --infinity: the schedule's size (default 1024)")
  p.add_argument("--aspect", help="with --infinity: height:width (default "
                 "1:1)")
  p.add_argument("--text-length", type=int, choices=(32, 64, 128, 256, 512),
                 help="with --infinity: the padded prompt length, as t2i "
                 "pads a job's prompts (default 128)")
  # Compile-only programs cannot be stored in or loaded from the cache.
  p.set_defaults(func=_run, compile_cache=False)


def _quiet_libtpu() -> None:
  """On a machine without TPUs, libtpu only compiles: set what it would look
  up for a TPU host (`topology.COMPILE_ONLY_ENV`, for this process) so that
  it neither logs the lookups' failures nor holds its one-process lock. A TPU
  VM's own settings are kept."""
  import os  # pylint: disable=import-outside-toplevel
  from var_jax.hardware import tpu_attached  # pylint: disable=import-outside-toplevel
  if tpu_attached():
    return
  for k, v in topology.COMPILE_ONLY_ENV.items():
    os.environ.setdefault(k, v)


# Flags of one kind of plan only: (attribute, flag).
_TRAIN_ONLY = (("global_batch", "--global-batch"),
               ("grad_accum", "--grad-accum"),
               ("remat", "--remat"), ("attention", "--attention"),
               ("fit", "--fit"), ("no_flop_count", "--no-flop-count"),
               ("mesh", "--mesh"))
_SAMPLE_ONLY = (("batch", "--batch"), ("scale_loop", "--scale-loop"),
                ("layer_loop", "--layer-loop"), ("infinity", "--infinity"))
_INFINITY_ONLY = (("resolution", "--resolution"), ("aspect", "--aspect"),
                  ("text_length", "--text-length"))
_VAR_ONLY = (("preset", "--preset"), ("scale_loop", "--scale-loop"))


def _check_applicable(args) -> None:
  """A flag of the other kind of plan is an error, not silently ignored."""
  wrong = _TRAIN_ONLY if args.sample else _SAMPLE_ONLY
  given = [flag for attr, flag in wrong if getattr(args, attr) not in
           (None, False)]
  if given:
    verb = "applies" if len(given) == 1 else "apply"
    to = ("the train step (without --sample)" if args.sample
          else "the sampler (--sample)")
    raise UserError(f"{', '.join(given)} only {verb} to {to}")
  wrong = _VAR_ONLY if args.infinity else _INFINITY_ONLY
  given = [flag for attr, flag in wrong if getattr(args, attr) is not None]
  if given:
    verb = "applies" if len(given) == 1 else "apply"
    to = "VAR (without --infinity)" if args.infinity else "--infinity"
    raise UserError(f"{', '.join(given)} only {verb} to {to}")


def _run(args) -> int:
  slice_ = topology.parse(args.topology, args.slices)
  reason = topology.libtpu_missing()
  if reason:
    raise UserError(reason)
  _quiet_libtpu()
  _check_applicable(args)
  from var_jax.planning import plan
  if args.sample and args.infinity:
    if args.batch is not None and args.batch < 1:
      raise UserError(f"--batch must be >= 1, got {args.batch}")
    from var_jax.sampling.infinity.commands import aspect_ratio  # pylint: disable=import-outside-toplevel
    rec = plan.plan_infinity_sampling(
        slice_, args.infinity, batch=args.batch or slice_.chips,
        dtype=args.dtype, resolution=args.resolution or 1024,
        ratio=aspect_ratio(args.aspect or "1:1"),
        text_len=args.text_length or 128,
        unroll=(args.layer_loop or "unrolled") == "unrolled", mesh=args.mesh)
  elif args.sample:
    if args.batch is not None and args.batch < 1:
      raise UserError(f"--batch must be >= 1, got {args.batch}")
    rec = plan.plan_sampling(slice_, args.preset or "d16",
                             batch=args.batch or 64,
                             dtype=args.dtype,
                             scale_loop=args.scale_loop or "python",
                             layer_loop=args.layer_loop or "unrolled",
                             mesh=args.mesh)
  else:
    rec = plan.plan_training(
        slice_, args.preset or "d16", global_batch=args.global_batch,
        grad_accum=args.grad_accum, mesh=args.mesh, remat=args.remat,
        dtype=args.dtype, attention=args.attention,
        count_flops=not args.no_flop_count, fit=args.fit)
  for line in plan.table(rec):
    print(line)
  print(json.dumps(rec, sort_keys=True))
  return 0

