"""What `sample`, `sample-many`, `edit` and `tune` do, once their flags are
parsed (`commands.py`): load the models, check every input before any
write, sample in batches, write the files and say what was written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import NamedTuple

from var_jax.sampling.commands import (FAST_DRAFT_STEPS, _user_error,
                                       options_from_flags)


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


def model_name(config, path) -> str:
  """What a model is called in a success line: its config's name, or, for
  a directory converted without a preset ("converted"), the folder's."""
  if config.name not in ("converted", "custom", ""):
    return config.name
  return path.name or str(path)


class _Loaded(NamedTuple):
  name: str  # The model(s), as the success line names them.
  vae: object
  var: object  # The refiner with a drafter.
  sampler: object
  notice: str | None  # The tuning notice for `_note`.


def _load(args, num_calls=None, batch=1) -> _Loaded:
  """The models and `Sampler` the sampling flags describe.

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
    _, vae, drafter = checkpoint.load_model("digits", need_var=True)
    # The refiner ships without a tokenizer copy: it is the bundled one.
    var = checkpoint.load_var("digits_refiner")
    name = "digits + digits_refiner"
  else:
    d = checkpoint.model_dir(args.ckpt)
    # Loaded by the name as typed, which an error names (./ckpt, not ckpt).
    model_config, vae, var = checkpoint.load_model(
        d if args.ckpt is None else args.ckpt, need_var=True)
    name = model_name(model_config, d)
    drafter = None
    if args.drafter_ckpt is not None:
      dd = checkpoint.model_dir(args.drafter_ckpt)
      d_config, d_vae, drafter = checkpoint.load_model(args.drafter_ckpt,
                                                       need_var=True)
      code.check_same_tokenizer(d_vae, vae)
      name = f"{model_name(d_config, dd)} + {name}"
  if drafter is not None:
    name += f" (CoDe, {steps} draft scales)"
  loops = loops_for(num_calls(var.cfg.num_classes)) if num_calls else (
      "python", "unrolled")
  opts = options_from_flags(args, draft_steps=steps, loops=loops)
  widest = var if drafter is None else max(
      (var, drafter), key=lambda m: m.cfg.embed_dim)
  plan, notice = stored_tuning(vae, widest, opts.dtype, batch)
  sampler = Sampler(vae, var, opts, drafter=drafter, tuning=plan)
  return _Loaded(name, vae, var, sampler, notice)


def _note(notice) -> None:
  """Prints the tuning notice once every input is checked (an error stays
  the only line a bad command prints)."""
  if notice:
    print(notice, file=sys.stderr)


def _loops(args, sampler) -> str:
  """How the program was compiled, in words, and why."""
  o = sampler.opts
  pair = (o.scale_loop, o.layer_loop)
  what = {("scan", "scan"): "the scan loops",
          ("python", "unrolled"): "the unrolled loops"}.get(
              pair, f"the {o.scale_loop} scale loop and the {o.layer_loop} "
                    "layer loop")
  if args.scale_loop is not None or args.layer_loop is not None:
    why = "as asked"
  elif pair == ("scan", "scan"):
    why = "quick to compile, for a short job"
  else:
    why = "slower to compile, faster per image, for a long job"
  return f"compiled with {what}: {why}"


def _files(names) -> str:
  """'a', 'a and b', 'a, b and c'."""
  names = [str(n) for n in names]
  return names[0] if len(names) == 1 else (
      ", ".join(names[:-1]) + " and " + names[-1])


def class_ids(text, flag="--labels") -> list[int]:
  """The integers of a comma-separated list, checked for form only (the
  range needs the model: `_parse_labels`).

  Raises:
    UserError: an empty entry (named by its position) or one that is not an
      integer.
  """
  entries = str(text).split(",")
  for i, v in enumerate(entries, 1):
    if not v.strip():
      raise _user_error(f"{flag} {text!r}: entry {i} is empty; give "
                        "comma-separated class ids, e.g. 3,7")
  try:
    return [int(v) for v in entries]
  except ValueError:
    raise _user_error(f"{flag} must be comma-separated integers, got "
                      f"{text!r}") from None


def count(n: int, noun: str) -> str:
  """'1 sample', '2 samples'."""
  return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def each_file_summary(folder, paths) -> list[str]:
  """The files `--out-dir` received, as entries of a one-line success
  message: the paths themselves when at most two, else one entry naming
  the folder, the count and the first and last name."""
  paths = [str(p) for p in paths]
  if len(paths) <= 2:
    return paths
  first, last = (os.path.basename(p) for p in (paths[0], paths[-1]))
  return [f"{str(folder).rstrip('/')}/ ({len(paths)} PNG files, {first} ... "
          f"{last})"]


def _parse_labels(text, num_classes, flag="--labels"):
  labels = class_ids(text, flag)
  bad = [v for v in labels if not 0 <= v <= num_classes]
  if bad:
    raise _user_error(f"{flag} must be class ids in [0, {num_classes}] "
                      f"({num_classes} = unconditional); got {text!r}")
  return labels


def _check_outputs(args, suffix=None):
  """Refuses --out / --save-npz paths that can never be written, before the
  model is loaded (nothing is written by the check). Without `suffix`,
  --out is an image whose extension names its format."""
  from var_jax.io import check_output_file
  from var_jax.sampling import images as image_io
  if args.out is not None:
    check_output_file(args.out, suffix)
    if suffix is None:
      image_io.image_format(args.out)
  if getattr(args, "save_npz", None):
    check_output_file(args.save_npz, ".npz", "--save-npz")
  if getattr(args, "out_dir", None):
    image_io.check_output_dir(args.out_dir)
    if args.out is not None and image_io.is_sample_file_name(
        os.path.basename(os.fspath(args.out))) and os.path.abspath(
            os.path.dirname(os.fspath(args.out)) or ".") == os.path.abspath(
                os.fspath(args.out_dir)):
      raise _user_error(f"--out {args.out} is a sample file name in --out-dir"
                        f" {args.out_dir}: the samples would overwrite the "
                        "grid; give the grid another name")


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
# Without --labels, models with at most this many classes draw every class.
_EVERY_CLASS_MAX = 100
_DEFAULT_COUNT = 8


def sample_labels(labels_text, num, per_class, num_classes, seed):
  """(labels, grid columns or None) that `var-jax sample`'s flags ask for.

  --labels with --num N: N samples cycling over the labels; with
  --per-class P: P of each, one grid row per label; alone: one each.
  Without --labels, --num N spreads N samples evenly over the classes
  (sorted, each class within one of the others' count; random classes for
  models of over 100), and --per-class P draws P of every class. With
  neither, 8 of every class for at most 100 classes, else 8 random ones.

  Raises:
    UserError: --num with --per-class, or bad --labels.
  """
  import numpy as np
  if num is not None and per_class is not None:
    raise _user_error("--num N (N samples in all) and --per-class P (P of "
                      "each class) do not combine; give one")
  if labels_text is not None:
    given = _parse_labels(labels_text, num_classes)
    if num is not None:
      return [given[i % len(given)] for i in range(num)], None
    if per_class is not None:
      return [c for c in given for _ in range(per_class)], per_class
    return given, None
  rng = np.random.default_rng(seed)
  if num is not None:
    if num_classes <= _EVERY_CLASS_MAX:
      return [i * num_classes // num for i in range(num)], None
    return rng.integers(0, num_classes, num).tolist(), None
  if per_class is not None or num_classes <= _EVERY_CLASS_MAX:
    p = per_class or _DEFAULT_COUNT
    return [c for c in range(num_classes) for _ in range(p)], p
  return rng.integers(0, num_classes, _DEFAULT_COUNT).tolist(), None


def cmd_sample(args: argparse.Namespace) -> int:
  import numpy as np
  from var_jax.sampling import images as image_io
  if args.out is None and args.out_dir is None:
    args.out = "samples.png"
  if args.num is not None and args.per_class is not None:
    sample_labels(None, args.num, args.per_class, 1, 0)  # Raises.
  if args.labels is not None:
    class_ids(args.labels)
  _check_outputs(args)
  if args.out_dir and not args.overwrite:
    image_io.check_unused_dir(args.out_dir)

  def job(n_cls):
    return sample_labels(args.labels, args.num, args.per_class, n_cls,
                         args.seed)

  m = _load(args, num_calls=lambda n_cls: _calls(len(job(n_cls)[0]),
                                                 args.batch),
            batch=args.batch)
  labels, ncol = job(m.var.cfg.num_classes)
  _note(m.notice)
  t0 = time.perf_counter()
  idx, imgs = _sample_batched(m.sampler, labels, args.seed, args.batch)
  dt = time.perf_counter() - t0
  written = []
  if args.out is not None:
    image_io.save_image(args.out, image_io.grid(
        imgs, args.ncol if args.ncol is not None else ncol or 8))
    written.append(args.out)
  if args.save_npz:
    image_io.save_npz(args.save_npz, images=imgs.astype(np.float32),
                      labels=np.asarray(labels, np.int32),
                      **{f"idx_{i}": a.astype(np.int32)
                         for i, a in enumerate(idx)})
    written.append(args.save_npz)
  if args.out_dir:
    paths = image_io.save_each(args.out_dir, imgs, labels, args.seed,
                               replace=args.overwrite)
    written += each_file_summary(args.out_dir, paths)
  print(f"wrote {count(len(labels), 'sample')} of {m.name} to "
        f"{_files(written)} in "
        f"{dt:.1f} s, compilation included ({_loops(args, m.sampler)})")
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
    if any(v != int(v) for v in box):
      raise _user_error(
          f"--box {text} mixes fractions and pixels: give four fractions in "
          f"[0, 1] of the image side, or four whole pixels in [0, {side}]")
    if max(box) > side or min(box) < 0:
      raise _user_error(
          f"--box {text} is outside the image: give fractions in [0, 1] of "
          f"the image side, or pixels in [0, {side}] of the model's "
          f"{side}x{side} resolution")
    box = [v / side for v in box]
  return box


def cmd_edit(args: argparse.Namespace) -> int:
  import numpy as np
  from var_jax.sampling.var import edit
  from var_jax.sampling import images as image_io
  _check_outputs(args)
  m = _load(args, num_calls=lambda _: 1, batch=args.num)
  side = m.vae.cfg.resolution
  pn = m.var.cfg.patch_nums[-1]
  mask = edit.box_mask(pn, _parse_box(args.box, side),
                       inpaint=args.mode == "inpaint")
  if mask.all():
    raise _user_error(
        f"--box {args.box} leaves nothing to {args.mode}: every one of the "
        f"{mask.size} finest-scale tokens would be kept "
        + ("(the box covers less than one token)" if args.mode == "inpaint"
           else "(the box covers the whole image)"))
  img = image_io.read_image(args.image, side)  # [0, 1], as edit takes.
  n_cls = m.var.cfg.num_classes
  label = n_cls if args.label is None else args.label
  if not 0 <= label <= n_cls:
    raise _user_error(f"--label must be in [0, {n_cls}] ({n_cls} = "
                      f"unconditional), got {label}")
  imgs = np.broadcast_to(img, (args.num,) + img.shape)
  _note(m.notice)
  out = edit.zero_shot_edit(m.sampler, m.vae, imgs, mask, label,
                            seed=args.seed, allow_null=True)
  result = np.asarray(out.images_BHWC)
  image_io.save_image(args.out, image_io.grid(result, args.num, pad=0)
                      if args.num > 1 else image_io.to_uint8(result[0]))
  written = [args.out]
  if args.save_npz:
    image_io.save_npz(args.save_npz, images=result, mask=mask,
                      **{f"idx_{i}": np.asarray(a, np.int32)
                         for i, a in enumerate(out.idx)})
    written.append(args.save_npz)
  target = "unconditional" if label == n_cls else f"towards class {label}"
  kept = int(mask.sum())
  variants = f" ({args.num} variants)" if args.num > 1 else ""
  print(f"wrote {_files(written)}: {args.image} {args.mode}ed{variants} by "
        f"{m.name}, {target}, {kept} of {mask.size} finest-scale tokens "
        f"kept ({_loops(args, m.sampler)})")
  return 0


# ------------------------------------------------------------------ many
def cmd_sample_many(args: argparse.Namespace) -> int:
  from var_jax import checkpoint
  from var_jax.sampling import many
  if args.classes is not None:
    class_ids(args.classes, "--classes")
  _check_outputs(args, suffix=".npz")
  many.check_devices(args.batch)
  ckpt = checkpoint.model_dir(args.ckpt)
  n_cls = checkpoint.load_config(ckpt if args.ckpt is None else
                                 args.ckpt).var
  if n_cls is None:
    raise _user_error(f"{ckpt} holds a tokenizer only; sample-many needs a "
                      "VAR transformer too")
  n_cls = n_cls.num_classes
  classes = (list(range(n_cls)) if args.classes is None else
             _parse_labels(args.classes, n_cls, "--classes"))
  meta = many.job_meta(
      {"ckpt": ("bundled" if args.ckpt in (None, "digits") else
               str(args.ckpt)), "model": checkpoint.fingerprint(ckpt),
       "drafter_model": (None if args.drafter_ckpt is None else
                         checkpoint.fingerprint(args.drafter_ckpt)),
       "cfg": args.cfg,
       "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
       "temperature": args.temperature, "cfg_until": args.cfg_until,
       "drafter_ckpt": args.drafter_ckpt, "draft_steps": args.draft_steps,
       "more_smooth": args.more_smooth, "dtype": args.dtype,
       "per_class": args.per_class, "batch": args.batch,
       "classes": classes}, classes, args.per_class)
  n = many.finished(args.out, meta, overwrite=args.overwrite)
  if n is not None:
    print(f"{args.out} is complete: {count(n, 'sample')} with these "
          "settings; nothing to do (--overwrite draws them again)")
    return 0
  many.check_resumable(args.out, meta, overwrite=args.overwrite)
  m = _load(args, num_calls=lambda _: _calls(len(classes) * args.per_class,
                                             args.batch), batch=args.batch)
  _note(m.notice)
  n = many.sample_many(m.sampler, classes, args.per_class, args.batch,
                       args.seed, args.out, meta, allow_null=True,
                       overwrite=args.overwrite)
  print(f"wrote {count(n, 'sample')} of {m.name} to {args.out} (arr_0, "
        "uint8)")
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
