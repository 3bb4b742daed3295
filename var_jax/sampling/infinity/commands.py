"""CLI: `convert-infinity` (official files -> a model directory) and `t2i`
(prompts -> images)."""

from __future__ import annotations

import argparse
import os

from var_jax.models.infinity.config import SAMPLING_DTYPES

ASPECTS = "1:1, 4:5, 5:4, 3:4, 4:3, 2:3, 3:2, 4:7, 7:4, 1:2, 2:1, 2:5, 5:2, " \
    "1:3, 3:1"


def register(sub) -> None:
  p = sub.add_parser(
      "convert-infinity",
      help="official Infinity files -> a var-jax Infinity model directory",
      description="Reads the transformer (infinity_2b_reg.pth, or the 8B "
                  "model's infinity_8b_weights/ folder of shards), its "
                  "tokenizer (infinity_vae_d32reg.pth, "
                  "infinity_vae_d56_f8_14_patchify.pth) and a Hugging Face "
                  "T5 directory (google/flan-t5-xl: config.json, "
                  "safetensors, tokenizer.json) without torch, checks that "
                  "they belong together, and writes one model directory.")
  p.add_argument("--infinity", required=True,
                 help="the transformer .pth, or a folder of shards with "
                      "their index (model.safetensors.index.json or "
                      "pytorch_model.bin.index.json)")
  p.add_argument("--tokenizer", required=True, help="the BSQ tokenizer .pth")
  p.add_argument("--text-encoder", required=True, metavar="DIR",
                 help="the T5 directory (config.json, model.safetensors or "
                      "shards with model.safetensors.index.json, "
                      "tokenizer.json)")
  p.add_argument("--out", required=True, help="output model directory")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing output directory")
  p.set_defaults(func=cmd_convert)

  p = sub.add_parser(
      "t2i", help="text to image with an Infinity model directory",
      description="Draws one image per prompt (Infinity's scale loop, "
                  "classifier-free guidance on the logits by default).")
  p.add_argument("--ckpt", required=True, metavar="DIR",
                 help="an Infinity model directory (convert-infinity)")
  p.add_argument("--prompt", action="append", default=[],
                 help="a prompt (repeat for several)")
  p.add_argument("--prompts-file", help="a text file, one prompt per line")
  p.add_argument("--negative-prompt", help="guide away from this text "
                 "instead of the learned empty prompt")
  p.add_argument("--resolution", type=int, choices=(256, 512, 1024),
                 default=1024, help="the schedule's size (the square "
                 "equivalent; the aspect ratio shapes it)")
  p.add_argument("--aspect", default="1:1",
                 help=f"height:width, one of {ASPECTS}")
  p.add_argument("--cfg", type=float, default=3.0, help="guidance scale")
  p.add_argument("--tau", type=float, default=0.5,
                 help="temperature (logits are divided by it)")
  p.add_argument("--top-k", type=int, default=900,
                 help="keep each bit's k likelier classes (2 or more: all)")
  p.add_argument("--top-p", type=float, default=0.97,
                 help="drop a bit's less likely class when its probability "
                      "is at most 1 - top_p")
  p.add_argument("--cfg-insertion-layer", type=int, default=0,
                 help="0: guide the logits; -n: the hidden states after "
                      "block depth - n")
  p.add_argument("--seed", type=int, default=0,
                 help="random seed (>= 0); prompt i's draw uses its own keys")
  p.add_argument("--dtype", choices=SAMPLING_DTYPES, default="float32",
                 help="the matrices of the transformer blocks and of the "
                      "text encoder, and the KV cache (matmuls sum in "
                      "float32; the head, text pool and tokenizer stay "
                      "float32; default float32)")
  p.add_argument("--out", required=True,
                 help="an image file (.png, .jpg, .webp) for one prompt, a "
                      "folder for several (000000.png, ... by non-blank "
                      "line; "
                      "resumable: the same command again draws only the "
                      "missing images)")
  p.add_argument("--batch", type=int, default=None,
                 help="prompts per call with several prompts, split over "
                      "the local devices (default: their count)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace the --out image, or the images of an earlier "
                      "job in the --out folder")
  p.set_defaults(func=cmd_t2i)


def _user_error(msg):
  from var_jax.errors import UserError
  return UserError(msg)


def cmd_convert(args: argparse.Namespace) -> int:
  from var_jax.convert.infinity import directory
  from var_jax.io import as_path
  if as_path(args.out).exists() and not args.overwrite:
    raise _user_error(f"--out {args.out} already exists; pass --overwrite "
                      "to replace it")
  if not as_path(args.infinity).exists():
    raise _user_error(f"--infinity {args.infinity}: no such file or "
                      "directory")
  if not as_path(args.tokenizer).is_file():
    raise _user_error(f"--tokenizer {args.tokenizer}: no such file")
  if not as_path(args.text_encoder).is_dir():
    raise _user_error(f"--text-encoder {args.text_encoder}: no such "
                      "directory")
  directory.convert(args.infinity, args.tokenizer, args.text_encoder,
                    args.out, overwrite=args.overwrite)
  return 0


def aspect_ratio(text: str) -> float:
  """'H:W' -> the listed height / width ratio it names.

  Raises:
    UserError: not H:W, or a ratio the schedules do not have.
  """
  from var_jax.models.infinity import schedules
  import math
  try:
    h, w = (float(x) for x in text.split(":"))
    ratio = h / w
    if not (math.isfinite(ratio) and ratio > 0):
      raise ValueError(text)
  except (ValueError, ZeroDivisionError):
    raise _user_error(f"--aspect {text!r}: expected height:width, e.g. "
                      "1:1 or 16:9") from None
  near = schedules.nearest_ratio(ratio)
  if abs(near - ratio) > 0.01 * ratio:
    raise _user_error(f"--aspect {text}: no schedule for height/width "
                      f"{ratio:.3f}; the aspect ratios are {ASPECTS}")
  return near


def _prompts(args) -> list[str]:
  from var_jax.io import as_path
  prompts = list(args.prompt)
  if args.prompts_file:
    path = as_path(args.prompts_file)
    if not path.is_file():
      raise _user_error(f"--prompts-file {path}: no such file")
    try:
      lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
      raise _user_error(f"--prompts-file {path}: not UTF-8 text (byte "
                        f"{e.start})") from None
    found = [ln.strip() for ln in lines if ln.strip()]
    if not found:
      raise _user_error(f"--prompts-file {path} holds no prompts (blank "
                        "lines are skipped)")
    prompts += found
  if not prompts:
    raise _user_error("give --prompt (one or more) or --prompts-file")
  return prompts


def _single_file(out: str, n: int, overwrite: bool) -> bool:
  """True when --out names one image file (one prompt, an extension).

  Raises:
    UserError: an image name for several prompts, an unknown extension, an
      existing image without `overwrite`, or a path that is a folder.
  """
  from var_jax.io import as_path
  from var_jax.sampling import images
  if not out:
    raise _user_error("--out is empty: give an image file or a folder")
  ext = os.path.splitext(out)[1].lower()
  if n > 1 and ext in images.IMAGE_FORMATS:
    raise _user_error(f"--out {out} names an image file, but {n} prompts "
                      "write a folder of images; give a folder")
  if n == 1 and ext:
    images.image_format(out)  # Raises on an unknown extension.
    path = as_path(out)
    if path.is_dir():
      raise _user_error(f"--out {out} is a folder; give an image file name "
                        "(or a folder without an extension)")
    if path.exists() and not overwrite:
      raise _user_error(f"--out {out} exists; pass --overwrite to replace "
                        "it")
    return True
  images.check_output_dir(out, "--out")
  return False


def cmd_t2i(args: argparse.Namespace) -> int:
  from var_jax.sampling.infinity.sampler import InfinityOptions
  prompts = _prompts(args)
  ratio = aspect_ratio(args.aspect)
  if args.negative_prompt is not None and not args.negative_prompt.strip():
    raise _user_error("--negative-prompt is empty")
  single = _single_file(args.out, len(prompts), args.overwrite)
  opts = InfinityOptions(cfg=args.cfg, tau=args.tau, top_k=args.top_k,
                         top_p=args.top_p,
                         cfg_insertion_layer=args.cfg_insertion_layer,
                         dtype=args.dtype)
  opts.per_scale(1, max(1, -args.cfg_insertion_layer))  # Values, now.
  if args.seed < 0:
    raise _user_error(f"--seed must be >= 0, got {args.seed}")
  import jax
  from var_jax import checkpoint
  from var_jax.sampling import many
  from var_jax.sampling.infinity import jobs
  from var_jax.sampling.images import save_image
  if single:
    image = jobs.text_to_image(args.ckpt, prompts, opts, seed=args.seed,
                               resolution=args.resolution, ratio=ratio,
                               negative=args.negative_prompt)[0]
    save_image(args.out, image)
    print(f"wrote {args.out}")
    return 0
  batch = len(jax.local_devices()) if args.batch is None else args.batch
  many.check_devices(batch)
  from var_jax.io import as_path, is_local
  ckpt = as_path(args.ckpt)
  meta = {"ckpt": str(ckpt.absolute() if is_local(ckpt) else ckpt),
          "model": checkpoint.fingerprint(args.ckpt),
          "seed": args.seed, "resolution": args.resolution,
          "aspect_ratio": ratio, "cfg": args.cfg, "tau": args.tau,
          "top_k": args.top_k, "top_p": args.top_p,
          "cfg_insertion_layer": args.cfg_insertion_layer,
          "dtype": args.dtype, "negative_prompt": args.negative_prompt}
  jobs.check_folder(args.out, dict(meta, prompts=jobs.prompts_digest(prompts),
                                   total=len(prompts)),
                    overwrite=args.overwrite)
  drawer = jobs.Drawer(args.ckpt, opts)
  jobs.t2i_folder(drawer, prompts, seed=args.seed,
                  resolution=args.resolution, ratio=ratio,
                  negative=args.negative_prompt, batch=batch, out=args.out,
                  meta=meta, overwrite=args.overwrite)
  return 0
