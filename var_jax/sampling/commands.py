"""CLI: `sample`, `sample-many`, `edit` and `bench sample`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from var_jax.models.var.config import COMPUTE_DTYPES


def _user_error(msg):
  from var_jax.errors import UserError
  return UserError(msg)


def _flag_type(parse, check, what):
  """An argparse type: text -> `parse` -> `check(name, value)` (the library's
  own domain check, so the CLI and `SampleOptions` agree)."""
  def convert(text):
    try:
      return check("value", parse(text))
    except (ValueError, TypeError):
      raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}"
                                       ) from None
  convert.__name__ = what
  return convert


def _schedule(parse, check, what):
  """A type for one value or a comma-separated list (one per scale)."""
  one = _flag_type(parse, check, what)

  def convert(text):
    vals = tuple(one(v) for v in str(text).split(","))
    return vals[0] if len(vals) == 1 else vals
  convert.__name__ = what
  return convert


def _checks():
  from var_jax.sampling.var import options as s
  return s


def _int_at_least(low):
  def check(_, v):
    if v < low:
      raise ValueError
    return v
  return check


_POSITIVE = _flag_type(int, _int_at_least(1), "an integer >= 1")


def _add_sampling_flags(p, *, cfg, top_k, top_p):
  s = _checks()
  p.add_argument("--ckpt", help="model directory (default: the bundled "
                 "digits model); with --drafter-ckpt, the refiner")
  p.add_argument("--cfg", default=cfg,
                 type=_flag_type(float, s.check_cfg, "a finite number"),
                 help=f"classifier-free guidance scale (default {cfg})")
  p.add_argument("--top-k", default=top_k,
                 type=_schedule(int, s.check_top_k, "integers >= 0"),
                 help=f"keep the k most likely tokens, 0 = all (default "
                      f"{top_k}); one value or one per scale, e.g. "
                      f"600,600,...; --top-k 1 --top-p 0 is greedy")
  p.add_argument("--top-p", default=top_p,
                 type=_schedule(float, s.check_top_p, "numbers in [0, 1]"),
                 help=f"nucleus mass in [0, 1], 0 = off (default {top_p}); "
                      f"one value or one per scale")
  p.add_argument("--temperature", default=1.0,
                 type=_schedule(float, s.check_temperature,
                                "finite numbers > 0"),
                 help="divides the logits after top-k/top-p filtering "
                      "(default 1); one value or one per scale, e.g. CoDe's "
                      "1.1,1.1,1.1,1.1,1.1,1.1,1.1,1,1,1")
  p.add_argument("--cfg-until", default=None, metavar="SCALE",
                 type=_flag_type(int, _int_at_least(0), "a scale index >= 0"),
                 help="from this scale index on, sample without guidance "
                      "(batch B instead of 2B; default: guidance to the end)")
  p.add_argument("--drafter-ckpt", metavar="DIR",
                 help="collaborative decoding (CoDe): a larger model that "
                      "draws the first --draft-steps scales; --ckpt draws "
                      "the rest. Both must share the tokenizer")
  p.add_argument("--draft-steps", default=None, metavar="N",
                 type=_flag_type(int, _int_at_least(1), "an integer >= 1"),
                 help="scales the drafter draws (1..K-1; with "
                      "--drafter-ckpt)")
  p.add_argument("--seed", default=0,
                 type=_flag_type(int, s.check_seed_value,
                                 "an integer in [0, 2**32)"),
                 help="random seed in [0, 2**32) (default 0)")
  p.add_argument("--more-smooth", action="store_true",
                 help="Gumbel-softmax smoothing (for viewing, not for FID)")
  p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32",
                 help="transformer compute dtype (sampling stays float32)")
  p.add_argument("--scale-loop", choices=s.SCALE_LOOPS, default=None,
                 help="how the program steps over the scales: python (one "
                      "exact-size step per scale: a larger program, faster "
                      "per call) or scan (similar-sized scales share a "
                      "padded lax.scan step). Default: scan for jobs of at "
                      f"most {s.SCAN_MAX_CALLS} sampler calls (images / "
                      "--batch, rounded up), else python")
  p.add_argument("--layer-loop", choices=s.LAYER_LOOPS, default=None,
                 help="how the transformer blocks run: unrolled (one buffer "
                      "per layer: a larger program, faster per call) or "
                      "scan (a lax.scan over the stacked weights). Default: "
                      "chosen with --scale-loop's rule, scan for short jobs")


def register(sub) -> None:
  p = sub.add_parser(
      "sample", help="class-conditional samples -> a PNG grid",
      description="Samples with classifier-free guidance. Without --labels "
                  "a model with at most 100 classes draws --per-class "
                  "samples of every class (one row per class); a larger "
                  "one draws --num random classes.")
  _add_sampling_flags(p, cfg=1.5, top_k=900, top_p=0.96)
  p.add_argument("--labels", help="comma-separated class ids, e.g. 207,980")
  p.add_argument("--per-class", type=_POSITIVE, default=8,
                 help="samples per class without --labels (default 8)")
  p.add_argument("--num", type=_POSITIVE, default=8,
                 help="random-class samples for large label sets")
  p.add_argument("--batch", type=_POSITIVE, default=64,
                 help="samples per compiled call (default 64)")
  p.add_argument("--ncol", type=int, help="grid columns")
  p.add_argument("--out", default="samples.png", help="grid PNG to write")
  p.add_argument("--save-npz", help="also write idx_0.. and images here")
  p.add_argument("--fast", action="store_true",
                 help="collaborative decoding with the bundled pair: the "
                      "digits VAR draws the first scales, a half-depth "
                      f"refiner the rest (--draft-steps, default "
                      f"{FAST_DRAFT_STEPS}); not with --ckpt/--drafter-ckpt")
  p.set_defaults(func=cmd_sample)

  p = sub.add_parser(
      "sample-many", help="the 50k-sample FID/IS run (ADM .npz format)",
      description="Samples --per-class images of every class, sharded over "
                  "all local devices, in chunks that survive interruption: "
                  "re-running the same command resumes.")
  _add_sampling_flags(p, cfg=1.5, top_k=900, top_p=0.96)
  p.add_argument("--per-class", type=_POSITIVE, default=50)
  p.add_argument("--classes", help="comma-separated subset of classes "
                 "(default: all)")
  p.add_argument("--batch", type=_POSITIVE, default=64,
                 help="samples per step over all local devices")
  p.add_argument("--out", required=True, help="output .npz (arr_0 uint8)")
  p.set_defaults(func=cmd_sample_many)

  p = sub.add_parser(
      "edit", help="zero-shot inpainting / outpainting / class editing",
      description="Keeps the image's tokens outside (inpaint) or inside "
                  "(outpaint) the box at every scale and generates the rest.")
  _add_sampling_flags(p, cfg=3.0, top_k=900, top_p=0.95)
  p.add_argument("--image", required=True, help="input image (any size and "
                 "Pillow format; resized and center-cropped to the model's "
                 "resolution). Images are read as a viewer shows them: EXIF "
                 "orientation applied, 16/32-bit images scaled to 8 bits, "
                 "palette/CMYK/gray converted, transparency composited over "
                 "white.")
  p.add_argument("--box", required=True, help="y0,x0,y1,x1 as fractions in "
                 "[0, 1] of the side, or pixels of the model resolution")
  p.add_argument("--mode", choices=("inpaint", "outpaint"), default="inpaint")
  p.add_argument("--label", type=int, help="class to edit towards (default: "
                 "unconditional, the null class)")
  p.add_argument("--num", type=_POSITIVE, default=1, help="variants to draw")
  p.add_argument("--out", required=True, help="output PNG")
  p.add_argument("--save-npz", help="also write idx_0.., images and mask")
  p.set_defaults(func=cmd_edit)

  p = sub.add_parser(
      "tune", help="measure how this CPU samples fastest (stored, read by "
      "sample, sample-many and edit)",
      description="Times the candidate compiler options and decoder forms "
                  "of the sampling programs on this CPU for one model shape "
                  "(one transformer matmul and one full-resolution decoder "
                  "block each; seconds, not minutes) and stores the fastest "
                  "in the cache directory's cpu_plans.json, for one-image "
                  "and many-image calls.")
  p.add_argument("--ckpt", help="model directory whose shape to tune for "
                 "(default: the bundled digits model)")
  p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32",
                 help="transformer compute dtype to tune for")
  p.set_defaults(func=cmd_tune)

  from var_jax.flags import bench_parsers
  from var_jax.sampling import bench
  bench.add_parser(bench_parsers(sub))


# ------------------------------------------------------------------ helpers
def options_from_flags(args, *, draft_steps=None, loops=("python",
                                                         "unrolled")):
  """`SampleOptions` from the (already checked) sampling flags; `loops` is
  the (scale_loop, layer_loop) used where the flags leave them open."""
  from var_jax.sampling.var.sampler import SampleOptions
  return SampleOptions(
      cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
      temperature=args.temperature, cfg_until=args.cfg_until,
      draft_steps=draft_steps, more_smooth=getattr(args, "more_smooth", False),
      dtype=args.dtype, scale_loop=args.scale_loop or loops[0],
      layer_loop=args.layer_loop or loops[1])


# `var-jax sample --fast`: the bundled digits VAR drafts, the shipped refiner
# (tools/train_default_model.py --refiner) draws the rest.
FAST_DRAFT_STEPS = 2


def _calls(num_images: int, batch: int) -> int:
  """Sampler calls of a job: `num_images` in batches of `batch`."""
  return -(-num_images // batch)


def stored_tuning(vae, var, dtype, batch):
  """(the stored CPU tuning for this model and batch, or None; a one-line
  notice to print, or None). See `var-jax tune`."""
  import jax
  from var_jax import caches
  from var_jax.sampling import tuning
  if jax.default_backend() != "cpu":
    return None, None
  path = tuning.plan_file(caches.cache_root())
  key = tuning.plan_key(var.cfg.embed_dim, dtype, vae.cfg.ch,
                        vae.cfg.resolution, batch)
  plan = tuning.stored_plan(path, key)
  if plan is None:
    return None, (f"var-jax: note: no CPU tuning stored for this model shape "
                  f"and dtype ({dtype}); using XLA's defaults. `var-jax tune` "
                  "measures one once.")
  if plan.bf16_speedup is not None and plan.bf16_speedup < tuning.SLOWER:
    return plan, (f"var-jax: note: on this CPU bfloat16 matmuls measured "
                  f"{plan.bf16_speedup:.2f}x the speed of float32; --dtype "
                  "float32 is faster here")
  return plan, None


def _load(args, num_calls=None, batch=1):
  """(ModelConfig, VQVAE, the VAR (the refiner with a drafter), Sampler,
  the tuning notice for `_note`).

  `num_calls(num_classes)`, the number of sampler calls the job will make,
  picks the loops the flags leave open (`sampler.loops_for`). With
  --drafter-ckpt (or --fast) both models are read and their tokenizers
  compared (config and weights) before anything runs.
  """
  from var_jax import checkpoint
  from var_jax.sampling.var import code
  from var_jax.sampling.var.sampler import Sampler, loops_for
  fast = getattr(args, "fast", False)
  steps = args.draft_steps
  if fast:
    if args.ckpt is not None or args.drafter_ckpt is not None:
      raise _user_error("--fast samples with the bundled digits pair; it "
                        "does not combine with --ckpt or --drafter-ckpt")
    steps = FAST_DRAFT_STEPS if steps is None else steps
  elif (args.drafter_ckpt is None) != (steps is None):
    raise _user_error("--drafter-ckpt and --draft-steps go together")
  if fast:
    model_config, vae, drafter = checkpoint.load_model(None, need_var=True)
    # The refiner ships without a tokenizer copy: it is the bundled one.
    var = checkpoint.load_var(checkpoint.DEFAULT_MODEL.with_name(
        "digits_refiner"))
  else:
    model_config, vae, var = checkpoint.load_model(args.ckpt, need_var=True)
    drafter = None
    if args.drafter_ckpt is not None:
      _, d_vae, drafter = checkpoint.load_model(args.drafter_ckpt,
                                                need_var=True)
      code.check_same_tokenizer(d_vae, vae)
  loops = loops_for(num_calls(var.cfg.num_classes)) if num_calls else (
      "python", "unrolled")
  opts = options_from_flags(args, draft_steps=steps, loops=loops)
  widest = var if drafter is None else max(
      (var, drafter), key=lambda m: m.cfg.embed_dim)
  plan, notice = stored_tuning(vae, widest, opts.dtype, batch)
  sampler = Sampler(vae, var, opts, drafter=drafter, tuning=plan)
  return model_config, vae, var, sampler, notice


def _note(notice) -> None:
  """Prints the tuning notice once every input is checked (an error stays
  the only line a bad command prints)."""
  if notice:
    print(notice, file=sys.stderr)


def _loops(sampler) -> str:
  o = sampler.opts
  return f"{o.scale_loop} scale loop, {o.layer_loop} layer loop"


def _parse_labels(text, num_classes, flag="--labels"):
  try:
    labels = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise _user_error(f"{flag} must be comma-separated integers, got "
                      f"{text!r}") from None
  bad = [v for v in labels if not 0 <= v <= num_classes]
  if not labels or bad:
    raise _user_error(f"{flag} must be class ids in [0, {num_classes}] "
                      f"({num_classes} = unconditional); got {text!r}")
  return labels


def _check_outputs(args, suffix=None):
  """Refuses --out / --save-npz paths that can never be written, before the
  model is loaded (nothing is written by the check)."""
  from var_jax.io import check_output_file
  check_output_file(args.out, suffix)
  if getattr(args, "save_npz", None):
    check_output_file(args.save_npz, ".npz", "--save-npz")


def _sample_batched(sampler, labels, seed, batch, on_chunk=None):
  """Samples `labels` in chunks of `batch`; returns (idx list, images)."""
  import numpy as np
  idx, imgs = None, []
  for start in range(0, len(labels), batch):
    out = sampler(labels[start:start + batch], seed=seed, offset=start,
                  allow_null=True)
    chunk = [np.asarray(a) for a in out.idx]
    idx = chunk if idx is None else [np.concatenate([a, b])
                                     for a, b in zip(idx, chunk)]
    imgs.append(np.asarray(out.images_BHWC))
    if on_chunk:
      on_chunk(min(start + batch, len(labels)))
  return idx, np.concatenate(imgs)


# ------------------------------------------------------------------ sample
def cmd_sample(args: argparse.Namespace) -> int:
  import numpy as np
  from var_jax.sampling import images as image_io
  _check_outputs(args)

  def job(n_cls):
    """(labels, grid columns) for a model of `n_cls` classes."""
    if args.labels is not None:
      return _parse_labels(args.labels, n_cls), args.ncol
    if n_cls <= 100:
      return ([c for c in range(n_cls) for _ in range(args.per_class)],
              args.ncol or args.per_class)
    rng = np.random.default_rng(args.seed)
    return rng.integers(0, n_cls, args.num).tolist(), args.ncol

  model_config, _, var, sampler, notice = _load(
      args, num_calls=lambda n_cls: _calls(len(job(n_cls)[0]), args.batch),
      batch=args.batch)
  labels, ncol = job(var.cfg.num_classes)
  _note(notice)
  t0 = time.perf_counter()
  idx, imgs = _sample_batched(sampler, labels, args.seed, args.batch)
  dt = time.perf_counter() - t0
  image_io.save_png(args.out, image_io.grid(imgs, ncol or 8))
  if args.save_npz:
    image_io.save_npz(args.save_npz, images=imgs.astype(np.float32),
                      labels=np.asarray(labels, np.int32),
                      **{f"idx_{i}": a.astype(np.int32)
                         for i, a in enumerate(idx)})
  print(f"wrote {len(labels)} samples of {model_config.name} to {args.out} "
        f"({dt:.1f} s including compilation; {_loops(sampler)})")
  return 0


# ------------------------------------------------------------------ edit
def _parse_box(text, side):
  try:
    box = [float(v) for v in text.split(",")]
  except ValueError:
    box = []
  if len(box) != 4:
    raise _user_error(f"--box must be y0,x0,y1,x1, got {text!r}")
  if max(box) > 1:  # Pixels of the model's resolution.
    box = [v / side for v in box]
  return box


def cmd_edit(args: argparse.Namespace) -> int:
  import numpy as np
  from var_jax.sampling.var import edit
  from var_jax.sampling import images as image_io
  _check_outputs(args)
  _, vae, var, sampler, notice = _load(args, num_calls=lambda _: 1,
                                       batch=args.num)
  side = vae.cfg.resolution
  pn = var.cfg.patch_nums[-1]
  mask = edit.box_mask(pn, _parse_box(args.box, side),
                       inpaint=args.mode == "inpaint")
  img = image_io.load_image(args.image, side)
  label = var.cfg.num_classes if args.label is None else args.label
  if not 0 <= label <= var.cfg.num_classes:
    raise _user_error(f"--label must be in [0, {var.cfg.num_classes}]")
  imgs = np.broadcast_to(img, (args.num,) + img.shape)
  _note(notice)
  out = edit.zero_shot_edit(sampler, vae, imgs, mask, label, seed=args.seed,
                            allow_null=True)
  result = np.asarray(out.images_BHWC)
  image_io.save_png(args.out, image_io.grid(result, args.num, pad=0)
                    if args.num > 1 else image_io.to_uint8(result[0]))
  if args.save_npz:
    image_io.save_npz(args.save_npz, images=result, mask=mask,
                      **{f"idx_{i}": np.asarray(a, np.int32)
                         for i, a in enumerate(out.idx)})
  kept = int(mask.sum())
  print(f"wrote {args.out}: {args.mode} keeping {kept}/{mask.size} "
        f"last-scale tokens, label {label} ({_loops(sampler)})")
  return 0


# ------------------------------------------------------------------ many
def cmd_sample_many(args: argparse.Namespace) -> int:
  from var_jax.sampling import many
  _check_outputs(args, suffix=".npz")
  many.check_devices(args.batch)

  def chosen(n_cls):
    return (list(range(n_cls)) if args.classes is None else
            _parse_labels(args.classes, n_cls, "--classes"))

  _, _, var, sampler, notice = _load(args, num_calls=lambda n_cls: _calls(
      len(chosen(n_cls)) * args.per_class, args.batch), batch=args.batch)
  classes = chosen(var.cfg.num_classes)
  _note(notice)
  meta = {"ckpt": str(args.ckpt or "bundled"), "cfg": args.cfg,
          "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
          "temperature": args.temperature, "cfg_until": args.cfg_until,
          "drafter_ckpt": args.drafter_ckpt, "draft_steps": args.draft_steps,
          "more_smooth": args.more_smooth, "dtype": args.dtype,
          "per_class": args.per_class, "batch": args.batch,
          "classes": classes}
  n = many.sample_many(sampler, classes, args.per_class,
                       args.batch, args.seed, args.out, meta, allow_null=True)
  print(f"wrote {n} samples to {args.out} (arr_0, uint8)", file=sys.stderr)
  return 0


# ------------------------------------------------------------------ tune
def cmd_tune(args: argparse.Namespace) -> int:
  import jax
  from var_jax import caches, checkpoint
  from var_jax.sampling import tuning
  if jax.default_backend() != "cpu":
    raise _user_error(f"tuning applies to the CPU only; this machine runs "
                      f"on {jax.default_backend()}, where XLA's defaults "
                      "are used")
  _, vae, var = checkpoint.load_model(args.ckpt, need_var=True)
  path = tuning.plan_file(caches.cache_root())
  for batch in (1, 2):
    t0 = time.perf_counter()
    plan, record = tuning.probe(var.cfg.embed_dim, args.dtype, vae.cfg.ch,
                                vae.cfg.resolution, batch)
    key = tuning.plan_key(var.cfg.embed_dim, args.dtype, vae.cfg.ch,
                          vae.cfg.resolution, batch)
    tuning.store_plan(path, key, record)
    kind = "one image per call" if batch == 1 else "several images per call"
    print(f"{kind}: {json.dumps(plan.describe())} "
          f"({time.perf_counter() - t0:.1f} s)")
  print(f"stored in {path}")
  return 0
