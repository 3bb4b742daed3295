"""CLI: the flags of `sample`, `sample-many`, `edit` and `tune`.

What each command does is in `jobs.py`, imported when one runs, so that
building the parser loads no model code.
"""

from __future__ import annotations

import argparse

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


def _add_sampling_flags(p, *, cfg, top_k, top_p, one_call=False):
  """The flags every sampling command shares; `one_call`: the command
  makes one sampler call (edit), so the loops' default is fixed."""
  s = _checks()
  p.add_argument("--ckpt", metavar="DIR_OR_NAME",
                 help="model directory, or a model name: digits, "
                      "digits_refiner, d16..d36 (downloaded once; `var-jax "
                      "list`). Default: the bundled digits model. With "
                      "--drafter-ckpt, the refiner")
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
  p.add_argument("--drafter-ckpt", metavar="DIR_OR_NAME",
                 help="collaborative decoding (CoDe): a larger model "
                      "(directory or name, as --ckpt) that draws the first "
                      "--draft-steps scales; --ckpt draws the rest. Both "
                      "must share the tokenizer")
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
                 help="transformer compute dtype (sampling stays float32; "
                      "default float32)")
  p.add_argument("--scale-loop", choices=s.SCALE_LOOPS, default=None,
                 help="how the program steps over the scales: python (one "
                      "exact-size step per scale: a larger program, faster "
                      "per call) or scan (similar-sized scales share a "
                      "padded lax.scan step). Default: " + (
                          "scan (edit is one sampler call)" if one_call else
                          f"scan for jobs of at most {s.SCAN_MAX_CALLS} "
                          "sampler calls (images / --batch, rounded up), "
                          "else python"))
  p.add_argument("--layer-loop", choices=s.LAYER_LOOPS, default=None,
                 help="how the transformer blocks run: unrolled (one buffer "
                      "per layer: a larger program, faster per call) or "
                      "scan (a lax.scan over the stacked weights). Default: "
                      + ("scan (edit is one sampler call)" if one_call else
                         "chosen with --scale-loop's rule, scan for short "
                         "jobs"))


_IMAGE_EXTS = "png, jpg/jpeg or webp"

# `var-jax sample --fast`: the bundled digits VAR drafts, the shipped refiner
# (tools/train_default_model.py --refiner) draws the rest.
FAST_DRAFT_STEPS = 2


def _job(name: str):
  """The command `jobs.<name>`, imported when it runs."""
  def run(args):
    from var_jax.sampling import jobs  # pylint: disable=import-outside-toplevel
    return getattr(jobs, name)(args)
  run.__name__ = name
  return run


def register(sub) -> None:
  p = sub.add_parser(
      "sample", help="class-conditional samples -> an image grid",
      description="Samples with classifier-free guidance. --labels picks "
                  "the classes (one sample each; --num N: N samples "
                  "cycling over them; --per-class P: P of each). Without "
                  "--labels, --num N draws N samples spread over the "
                  "classes (random classes for models of over 100), and "
                  "--per-class P draws P of every class; with neither, a "
                  "model with at most 100 classes draws 8 of every class, "
                  "one row per class, a larger one 8 of random classes.")
  _add_sampling_flags(p, cfg=1.5, top_k=900, top_p=0.96)
  p.add_argument("--labels", help="comma-separated class ids, e.g. 207,980 "
                 "(the class count means unconditional)")
  p.add_argument("--num", type=_POSITIVE, default=None, metavar="N",
                 help="samples in all: cycling over --labels, or spread "
                      "over the classes without (default: one per label, "
                      "or --per-class's rule); not with --per-class")
  p.add_argument("--per-class", type=_POSITIVE, default=None, metavar="P",
                 help="samples of each class: of every --labels entry, or "
                      "of every class without --labels (default 8 of every "
                      "class for models of at most 100 classes); not with "
                      "--num")
  p.add_argument("--batch", type=_POSITIVE, default=64,
                 help="samples per compiled call (default 64)")
  p.add_argument("--ncol", type=_POSITIVE, metavar="N",
                 help="grid columns, >= 1 (default: --per-class, else 8)")
  p.add_argument("--out", default=None,
                 help=f"grid image to write, {_IMAGE_EXTS} by its extension "
                      "(default samples.png, or none with --out-dir alone)")
  p.add_argument("--out-dir", metavar="DIR",
                 help="also (or, without --out, only) write each sample as "
                      "its own PNG in DIR, named by index, label and seed, "
                      "e.g. 00003_label207_seed0.png. DIR must be new or "
                      "empty, unless --overwrite")
  p.add_argument("--overwrite", action="store_true",
                 help="write into an --out-dir that is not empty: its PNGs "
                      "named as samples are (NNNNN_labelL_seedS.png) are "
                      "removed first, other files are kept")
  p.add_argument("--save-npz", help="also write the tokens (idx_0..), images "
                 "(float32 in [0, 1]) and labels to this .npz")
  p.add_argument("--fast", action="store_true",
                 help="collaborative decoding with the bundled pair: the "
                      "digits VAR draws the first scales, a half-depth "
                      f"refiner the rest (--draft-steps, default "
                      f"{FAST_DRAFT_STEPS}); not with --ckpt/--drafter-ckpt")
  p.set_defaults(func=_job("cmd_sample"))

  p = sub.add_parser(
      "sample-many", help="the 50k-sample FID/IS run (ADM .npz format)",
      description="Samples --per-class images of every class, sharded over "
                  "all local devices, in chunks that survive interruption: "
                  "re-running the same command resumes, and once --out is "
                  "complete reports it and does nothing.")
  _add_sampling_flags(p, cfg=1.5, top_k=900, top_p=0.96)
  p.add_argument("--per-class", type=_POSITIVE, default=50, metavar="P",
                 help="samples of each class (default 50: 50,000 for "
                      "ImageNet's 1000 classes)")
  p.add_argument("--classes", help="comma-separated subset of classes "
                 "(default: all)")
  p.add_argument("--batch", type=_POSITIVE, default=64,
                 help="samples per step over all local devices (default "
                      "64)")
  p.add_argument("--out", required=True, help="output .npz (arr_0 uint8 "
                 "(N, H, W, 3), the settings in meta)")
  p.add_argument("--overwrite", action="store_true",
                 help="start over: draw every sample again, replacing an "
                      "existing --out and the parts of an interrupted run")
  p.set_defaults(func=_job("cmd_sample_many"))

  p = sub.add_parser(
      "edit", help="zero-shot inpainting / outpainting / class editing",
      description="Keeps the image's tokens outside (inpaint) or inside "
                  "(outpaint) the box at every scale and generates the rest.")
  _add_sampling_flags(p, cfg=3.0, top_k=900, top_p=0.95, one_call=True)
  p.add_argument("--image", required=True, help="input image (any size and "
                 "Pillow format; resized and center-cropped to the model's "
                 "resolution). Images are read as a viewer shows them: EXIF "
                 "orientation applied, 16/32-bit images scaled to 8 bits, "
                 "palette/CMYK/gray converted, transparency composited over "
                 "white.")
  p.add_argument("--box", required=True, help="y0,x0,y1,x1 as fractions in "
                 "[0, 1] of the image side, or (when a value is above 1) "
                 "pixels in [0, side] of the model's resolution")
  p.add_argument("--mode", choices=("inpaint", "outpaint"), default="inpaint",
                 help="inpaint: generate inside the box, keep the rest; "
                      "outpaint: keep the box, generate around it (default "
                      "inpaint)")
  p.add_argument("--label", type=int, help="class to edit towards (default: "
                 "unconditional, the null class)")
  p.add_argument("--num", type=_POSITIVE, default=1,
                 help="variants to draw, side by side (default 1)")
  p.add_argument("--out", required=True,
                 help=f"output image, {_IMAGE_EXTS} by its extension")
  p.add_argument("--save-npz", help="also write idx_0.., images (float32 in "
                 "[0, 1]) and mask")
  p.set_defaults(func=_job("cmd_edit"))

  p = sub.add_parser(
      "tune", help="measure how this CPU samples fastest (stored, read by "
      "sample, sample-many and edit)",
      description="Times the candidate compiler options and decoder forms "
                  "of the sampling programs on this CPU for one model shape "
                  "(one transformer matmul and one full-resolution decoder "
                  "block each; seconds, not minutes) and stores the fastest "
                  "in the cache directory's cpu_plans.json, for one-image "
                  "and many-image calls.")
  p.add_argument("--ckpt", metavar="DIR_OR_NAME",
                 help="model directory or name (as sample's --ckpt) whose "
                      "shape to tune for (default: the bundled digits model)")
  p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32",
                 help="transformer compute dtype to tune for")
  p.set_defaults(func=_job("cmd_tune"))

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
