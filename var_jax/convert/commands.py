"""CLI: `convert`, `encode` and `verify`."""

from __future__ import annotations

import argparse
import io

import numpy as np


def _user_error(msg):
  from var_jax.errors import UserError
  return UserError(msg)


def register(sub) -> None:
  p = sub.add_parser(
      "convert", help="official .pth checkpoints -> a var-jax model directory",
      description="Reads official VQVAE/VAR .pth files without torch (or "
                  ".safetensors files, with the safetensors package) and "
                  "writes an Orbax model directory plus config.json.")
  p.add_argument("--vae", help="official VQVAE .pth or .safetensors "
                 "(vae_ch160v4096z32.pth)")
  p.add_argument("--var", help="official VAR .pth or .safetensors "
                 "(var_d16.pth, ...)")
  p.add_argument("--out", required=True, help="output model directory")
  p.add_argument("--preset", help="check the files against a preset "
                 "(d16, d20, d24, d30, d36, tiny, ...)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing output directory")
  p.set_defaults(func=cmd_convert)

  p = sub.add_parser(
      "download", help="fetch a released model from Hugging Face, convert it",
      description="Downloads vae_ch160v4096z32.pth and var_<model>.pth from "
                  "huggingface.co/FoundationVision/var and converts them "
                  "into a model directory. With --code N or --refiner, "
                  "writes a collaborative-decoding pair instead: "
                  "OUT/drafter and OUT/refiner, two model directories for "
                  "`var-jax sample --ckpt OUT/refiner --drafter-ckpt "
                  "OUT/drafter --draft-steps N`. With --infinity 2b|8b, "
                  "Infinity's transformer and tokenizer from "
                  "huggingface.co/FoundationVision/Infinity and the "
                  "flan-t5-xl text encoder from google/flan-t5-xl, as one "
                  "model directory for `var-jax t2i`.")
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--model", choices=("d16", "d20", "d24", "d30", "d36"),
                 help="a released model (with --refiner: the drafter)")
  g.add_argument("--infinity", choices=("2b", "8b"),
                 help="Infinity's released text-to-image models (with the "
                      "flan-t5-xl text encoder) as one model directory for "
                      "`var-jax t2i`")
  g.add_argument("--code", type=int, metavar="N",
                 help="CoDe's fine-tuned pair for N draft steps (6, 7, 8 or "
                      "9): drafter_N.pth (d30) and refiner_N.pth (d16) from "
                      "huggingface.co/Zigeng/VAR_CoDe")
  p.add_argument("--refiner", choices=("d16", "d20", "d24", "d30", "d36"),
                 help="with --model: the training-free pair of two released "
                      "models (OUT/drafter is --model, OUT/refiner this one)")
  p.add_argument("--out", required=True, help="output model directory (with "
                 "--code or --refiner: the directory that gets drafter/ and "
                 "refiner/)")
  p.add_argument("--cache-dir", help="huggingface_hub cache directory "
                 "(default: its own, e.g. ~/.cache/huggingface/hub)")
  p.add_argument("--pth-dir", help="keep the .pth files as plain files in "
                 "this directory instead of the huggingface_hub cache")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing output directory")
  # Tests check small local files against another preset (e.g. tiny); for
  # a pair "DRAFTER,REFINER", an empty name meaning "as the tensors say".
  p.add_argument("--preset", help=argparse.SUPPRESS)
  p.set_defaults(func=cmd_download)

  p = sub.add_parser("encode", help="images -> multi-scale token ids",
                     description="Tokenizes uint8 images (B, H, W, 3).")
  p.add_argument("--ckpt", metavar="DIR_OR_NAME",
                 help="model directory, or a model name (digits, d16, ...; "
                      "`var-jax list`) whose tokenizer to use. Default: the "
                      "bundled digits model")
  p.add_argument("--images", required=True, help="uint8 .npy (B, H, W, 3)")
  p.add_argument("--out", required=True, help="output .npz with idx_0..")
  p.add_argument("--batch", type=int, default=16,
                 help="images per call (>= 1)")
  p.set_defaults(func=cmd_encode)

  p = sub.add_parser(
      "verify", help="compare with the official PyTorch code side by side",
      description="Needs torch (pip install torch; a CPU wheel is enough) "
                  "and a checkout of FoundationVision/VAR.")
  p.add_argument("--torch-repo", required=True, help="official VAR checkout")
  p.add_argument("--vae", required=True,
                 help="official VQVAE .pth or .safetensors")
  p.add_argument("--var", help="official VAR .pth or .safetensors")
  p.add_argument("--batch", type=int, default=2,
                 help="random test images (1..64)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the test images and labels (>= 0)")
  p.set_defaults(func=cmd_verify)


def cmd_convert(args: argparse.Namespace) -> int:
  from var_jax.convert.var.convert import convert_files
  from var_jax.io import as_path
  for flag in ("vae", "var"):
    path = getattr(args, flag)
    if path and not as_path(path).is_file():
      raise _user_error(f"--{flag} {path}: no such file")
  cfg = convert_files(args.vae, args.var, args.out, preset=args.preset,
                      overwrite=args.overwrite)
  what = " + ".join(n for n, c in (("VQVAE", cfg.vae), ("VAR", cfg.var)) if c)
  extra = ""
  if cfg.var is not None:
    extra = (f" depth={cfg.var.depth} width={cfg.var.embed_dim} "
             f"scales={list(cfg.var.patch_nums)}")
  print(f"wrote {what} to {args.out}{extra}")
  return 0


def cmd_download(args: argparse.Namespace) -> int:
  from var_jax.convert.var.download import download, download_pair
  if args.infinity:
    if args.refiner or args.preset:
      raise _user_error("--infinity takes no --refiner or --preset")
    from var_jax.convert.infinity import download as inf_download
    inf_download.download(args.infinity, args.out, cache_dir=args.cache_dir,
                          pth_dir=args.pth_dir, overwrite=args.overwrite)
    print(f"wrote Infinity {args.infinity} to {args.out}; draw with var-jax "
          f"t2i --ckpt {args.out} --prompt ...")
    return 0
  if args.code is not None and args.refiner:
    raise _user_error("--refiner goes with --model (the training-free pair); "
                      "CoDe's --code pairs are a d30 drafter and a d16 "
                      "refiner")
  if args.code is not None or args.refiner:
    presets = None
    if args.preset is not None:
      presets = tuple(n or None for n in (args.preset.split(",") + [""])[:2])
    d_cfg, _ = download_pair(
        args.out, steps=args.code, drafter=args.model or "d30",
        refiner=args.refiner or "d16", cache_dir=args.cache_dir,
        pth_dir=args.pth_dir, overwrite=args.overwrite, presets=presets)
    out = args.out.rstrip("/")
    steps = (args.code if args.code is not None else
             f"N (1..{len(d_cfg.var.patch_nums) - 1})")
    print(f"wrote {out}/drafter and {out}/refiner; sample with var-jax "
          f"sample --ckpt {out}/refiner --drafter-ckpt {out}/drafter "
          f"--draft-steps {steps}")
    return 0
  cfg = download(args.model, args.out, cache_dir=args.cache_dir,
                 pth_dir=args.pth_dir, overwrite=args.overwrite,
                 preset=args.preset)
  print(f"wrote {args.model} (VQVAE + VAR, scales "
        f"{list(cfg.var.patch_nums)}) to {args.out}")
  return 0


def load_images_u8(path, resolution: int) -> np.ndarray:
  """A uint8 (B, H, W, 3) .npy at the model's resolution, or a clear error."""
  from var_jax.io import as_path
  p = as_path(path)
  if not p.is_file():
    raise _user_error(f"--images {path}: no such file")
  try:
    imgs = np.load(io.BytesIO(p.read_bytes()), allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise _user_error(f"--images {path}: not a .npy array ({e})") from None
  if not isinstance(imgs, np.ndarray):  # An .npz archive.
    raise _user_error(f"--images {path}: an .npz archive, not one .npy array")
  if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[-1] != 3:
    raise _user_error(f"--images must be uint8 (B, H, W, 3); got "
                      f"{imgs.dtype} {imgs.shape}")
  if imgs.shape[1:3] != (resolution, resolution):
    raise _user_error(f"images are {imgs.shape[1]}x{imgs.shape[2]} but the "
                      f"model takes {resolution}x{resolution}")
  return imgs


def cmd_encode(args: argparse.Namespace) -> int:
  from var_jax.checkpoint import load_model
  from var_jax.io import check_output_file, save_npz
  from var_jax.models.var.vqvae import jit_tokenizer
  if args.batch < 1:
    raise _user_error(f"--batch must be at least 1, got {args.batch}")
  out = check_output_file(args.out, ".npz")
  cfg, vae, _ = load_model(args.ckpt, need_var=False)
  imgs = load_images_u8(args.images, cfg.vae.resolution)
  if len(imgs) == 0:
    raise _user_error(f"--images {args.images} holds no images")
  encode = jit_tokenizer(vae)  # The same images -> tokens as `tokenize`.
  outs = [[] for _ in cfg.vae.v_patch_nums]
  for i in range(0, len(imgs), args.batch):
    for k, idx in enumerate(encode(imgs[i:i + args.batch])):
      outs[k].append(np.asarray(idx, np.int32))
  save_npz(out, **{f"idx_{k}": np.concatenate(o)
                   for k, o in enumerate(outs)})
  print(f"wrote {len(imgs)} x {len(outs)} token maps to {args.out}")
  return 0


def cmd_verify(args: argparse.Namespace) -> int:
  from var_jax.convert.var.verify import import_torch, print_report, run_verify
  if not 1 <= args.batch <= 64:
    raise _user_error(f"--batch must be in 1..64, got {args.batch}")
  if args.seed < 0:
    raise _user_error(f"--seed must be >= 0, got {args.seed}")
  import_torch()  # Before reading any file: one line with the install command.
  report = run_verify(args.torch_repo, args.vae, args.var, args.batch,
                      args.seed)
  return print_report(report)
