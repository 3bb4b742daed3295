"""CLI: `sample`, `sample-many`, `edit` and `bench sample`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from var_jax.models.var.config import COMPUTE_DTYPES


def _user_error(msg):
  from var_jax.errors import UserError
  return UserError(msg)


def _add_sampling_flags(p, *, cfg, top_k, top_p):
  p.add_argument("--ckpt", help="model directory (default: the bundled "
                 "digits model); with --drafter-ckpt, the refiner")
  p.add_argument("--cfg", type=float, default=cfg,
                 help=f"classifier-free guidance scale (default {cfg})")
  p.add_argument("--top-k", default=str(top_k),
                 help=f"keep the k most likely tokens, 0 = all (default "
                      f"{top_k}); one value or one per scale, e.g. "
                      f"600,600,...; --top-k 1 --top-p 0 is greedy")
  p.add_argument("--top-p", default=str(top_p),
                 help=f"nucleus mass in [0, 1], 0 = off (default {top_p}); "
                      f"one value or one per scale")
  p.add_argument("--temperature", default="1",
                 help="divides the logits after top-k/top-p filtering "
                      "(default 1); one value or one per scale, e.g. CoDe's "
                      "1.1,1.1,1.1,1.1,1.1,1.1,1.1,1,1,1")
  p.add_argument("--cfg-until", type=int, default=None, metavar="SCALE",
                 help="from this scale index on, sample without guidance "
                      "(batch B instead of 2B; default: guidance to the end)")
  p.add_argument("--drafter-ckpt", metavar="DIR",
                 help="collaborative decoding (CoDe): a larger model that "
                      "draws the first --draft-steps scales; --ckpt draws "
                      "the rest. Both must share the tokenizer")
  p.add_argument("--draft-steps", type=int, default=None, metavar="N",
                 help="scales the drafter draws (1..K-1; with "
                      "--drafter-ckpt)")
  p.add_argument("--seed", type=int, default=0,
                 help="random seed in [0, 2**32) (default 0)")
  p.add_argument("--more-smooth", action="store_true",
                 help="Gumbel-softmax smoothing (for viewing, not for FID)")
  p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32",
                 help="transformer compute dtype (sampling stays float32)")
  p.add_argument("--form", choices=("unrolled", "scan"), default=None,
                 help="scale loop form (default: the faster one)")
  p.add_argument("--layer-loop", choices=("unrolled", "scan"), default=None,
                 help="how the transformer blocks are applied (default: "
                      "scan for jobs of at most 8 sampler calls, i.e. "
                      "images / --batch rounded up, one for edit: its "
                      "program compiles and loads faster; unrolled, faster "
                      "per call, for longer jobs)")


def register(sub) -> None:
  p = sub.add_parser(
      "sample", help="class-conditional samples -> a PNG grid",
      description="Samples with classifier-free guidance. Without --labels "
                  "a model with at most 100 classes draws --per-class "
                  "samples of every class (one row per class); a larger "
                  "one draws --num random classes.")
  _add_sampling_flags(p, cfg=1.5, top_k=900, top_p=0.96)
  p.add_argument("--labels", help="comma-separated class ids, e.g. 207,980")
  p.add_argument("--per-class", type=int, default=8,
                 help="samples per class without --labels (default 8)")
  p.add_argument("--num", type=int, default=8,
                 help="random-class samples for large label sets")
  p.add_argument("--batch", type=int, default=64,
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
  p.add_argument("--per-class", type=int, default=50)
  p.add_argument("--classes", help="comma-separated subset of classes "
                 "(default: all)")
  p.add_argument("--batch", type=int, default=64,
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
  p.add_argument("--num", type=int, default=1, help="variants to draw")
  p.add_argument("--out", required=True, help="output PNG")
  p.add_argument("--save-npz", help="also write idx_0.., images and mask")
  p.set_defaults(func=cmd_edit)

  try:
    from var_jax.sampling import bench
  except ImportError:
    return
  from var_jax.flags import bench_parsers
  bench.add_parser(bench_parsers(sub))


# ------------------------------------------------------------------ helpers
def parse_schedule(flag, text, kind):
  """'600' -> 600, '1.1,1.1,1' -> (1.1, 1.1, 1.0): a value or one per scale."""
  try:
    vals = [kind(v) for v in str(text).split(",")]
  except ValueError:
    raise _user_error(f"{flag} must be one {kind.__name__} value or a "
                      f"comma-separated list (one per scale), got {text!r}"
                      ) from None
  return vals[0] if len(vals) == 1 else tuple(vals)


def options_from_flags(args, *, draft_steps=None):
  """`SampleOptions` from the shared sampling flags (checked)."""
  import numpy as np
  from var_jax.sampling.var.sampler import (DEFAULT_FORM, DEFAULT_LAYER_LOOP,
                                        SampleOptions)
  top_k = parse_schedule("--top-k", args.top_k, int)
  top_p = parse_schedule("--top-p", args.top_p, float)
  if min(np.atleast_1d(top_k)) < 0 or not all(
      0 <= p <= 1 for p in np.atleast_1d(top_p)):
    raise _user_error(f"--top-k must be >= 0 and --top-p in [0, 1], got "
                      f"{args.top_k} and {args.top_p}")
  try:
    return SampleOptions(
        cfg=args.cfg, top_k=top_k, top_p=top_p,
        temperature=parse_schedule("--temperature", args.temperature, float),
        cfg_until=args.cfg_until, draft_steps=draft_steps,
        more_smooth=getattr(args, "more_smooth", False), dtype=args.dtype,
        form=args.form or DEFAULT_FORM,
        layer_loop=args.layer_loop or DEFAULT_LAYER_LOOP)
  except ValueError as e:  # UserError names the option; say the flag.
    raise _user_error(_as_flag(str(e))) from None


def _as_flag(msg):
  """'top_k must be ...' -> '--top-k must be ...': the name the user typed."""
  head, sep, rest = msg.partition(" ")
  if head in ("cfg", "top_k", "top_p", "temperature", "cfg_until",
              "draft_steps", "seed"):
    return "--" + head.replace("_", "-") + sep + rest
  return msg


# `var-jax sample --fast`: the bundled digits VAR drafts, the shipped refiner
# (tools/train_default_model.py --refiner) draws the rest.
FAST_DRAFT_STEPS = 2


def _calls(num_images: int, batch: int) -> int:
  """Sampler calls of a job: `num_images` in batches of `batch`."""
  return -(-num_images // batch)


def _layer_loop(args, opts, num_calls, var):
  """`opts` with the layer loop this job wants (the flag, else by its size)."""
  from var_jax.sampling.var.sampler import layer_loop_for
  if args.layer_loop is not None or num_calls is None:
    return opts
  return dataclasses.replace(
      opts, layer_loop=layer_loop_for(num_calls(var.cfg.num_classes)))


def _load_fast(args, opts, num_calls):
  """(ModelConfig, VQVAE, refiner, Sampler) of the bundled CoDe pair."""
  from var_jax import checkpoint
  from var_jax.sampling.var.sampler import Sampler
  if args.ckpt is not None or args.drafter_ckpt is not None:
    raise _user_error("--fast samples with the bundled digits pair; it does "
                      "not combine with --ckpt or --drafter-ckpt")
  model_config, vae, drafter = checkpoint.load_model(None, need_var=True)
  d = checkpoint.DEFAULT_MODEL.with_name("digits_refiner")
  # The refiner ships without a tokenizer copy: it is the bundled one.
  refiner = checkpoint.load_var(d)
  opts = _layer_loop(args, opts, num_calls, refiner)
  try:
    return model_config, vae, refiner, Sampler(vae, refiner, opts,
                                               drafter=drafter)
  except ValueError as e:
    raise _user_error(_as_flag(str(e))) from None


def _load(args, num_calls=None):
  """(ModelConfig, VQVAE, the VAR (the refiner with a drafter), Sampler).

  The sampling flags are checked before the models are read (class lists
  need the model's class count and are checked after). Without --layer-loop,
  `num_calls(num_classes)`, the number of sampler calls the job will make,
  picks it (`layer_loop_for`); without `num_calls` the default is kept.

  With --drafter-ckpt both model directories are read and their tokenizers
  compared (config and weights) before anything runs.
  """
  from var_jax import checkpoint
  from var_jax.sampling.var import code
  from var_jax.sampling.var.sampler import Sampler, check_seed
  fast = getattr(args, "fast", False)
  if not fast and (args.drafter_ckpt is None) != (args.draft_steps is None):
    raise _user_error("--drafter-ckpt and --draft-steps go together")
  steps = args.draft_steps
  opts = options_from_flags(args, draft_steps=FAST_DRAFT_STEPS
                            if fast and steps is None else steps)
  try:
    check_seed(args.seed)
  except ValueError as e:
    raise _user_error(_as_flag(str(e))) from None
  if fast:
    return _load_fast(args, opts, num_calls)
  model_config, vae, var = checkpoint.load_model(args.ckpt, need_var=True)
  drafter = None
  if args.drafter_ckpt is not None:
    _, d_vae, drafter = checkpoint.load_model(args.drafter_ckpt, need_var=True)
    code.check_same_tokenizer(d_vae, vae)
  opts = _layer_loop(args, opts, num_calls, var)
  try:
    sampler = Sampler(vae, var, opts, drafter=drafter)
  except ValueError as e:
    raise _user_error(_as_flag(str(e))) from None
  return model_config, vae, var, sampler


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


def _check_positive(**values):
  for name, v in values.items():
    if v < 1:
      raise _user_error(f"--{name.replace('_', '-')} must be >= 1, got {v}")


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
  _check_positive(per_class=args.per_class, num=args.num, batch=args.batch)
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

  model_config, _, var, sampler = _load(
      args, num_calls=lambda n_cls: _calls(len(job(n_cls)[0]), args.batch))
  labels, ncol = job(var.cfg.num_classes)
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
        f"({dt:.1f} s including compilation, {sampler.opts.layer_loop} "
        f"layer loop)")
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
  _check_positive(num=args.num)
  _check_outputs(args)
  _, vae, var, sampler = _load(args, num_calls=lambda _: 1)
  side = vae.cfg.resolution
  pn = var.cfg.patch_nums[-1]
  try:
    mask = edit.box_mask(pn, _parse_box(args.box, side),
                         inpaint=args.mode == "inpaint")
    img = image_io.load_image(args.image, side)
  except ValueError as e:
    raise _user_error(str(e)) from None
  label = var.cfg.num_classes if args.label is None else args.label
  if not 0 <= label <= var.cfg.num_classes:
    raise _user_error(f"--label must be in [0, {var.cfg.num_classes}]")
  imgs = np.broadcast_to(img, (args.num,) + img.shape)
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
        f"last-scale tokens, label {label}")
  return 0


# ------------------------------------------------------------------ many
def cmd_sample_many(args: argparse.Namespace) -> int:
  from var_jax.sampling import many
  _check_positive(per_class=args.per_class, batch=args.batch)
  _check_outputs(args, suffix=".npz")
  many.check_devices(args.batch)

  def chosen(n_cls):
    return (list(range(n_cls)) if args.classes is None else
            _parse_labels(args.classes, n_cls, "--classes"))

  _, _, var, sampler = _load(args, num_calls=lambda n_cls: _calls(
      len(chosen(n_cls)) * args.per_class, args.batch))
  classes = chosen(var.cfg.num_classes)
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
