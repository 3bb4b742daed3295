"""`var-jax train`, `train-vae`, `tokenize` and `bench train`."""

from __future__ import annotations

import dataclasses

from var_jax.models.var.config import COMPUTE_DTYPES, REMAT_CHOICES

# How every image-reading command reads a folder (data.decode.decode_image).
_FOLDER_HELP = (" (folder: .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp, "
                "any case; images are read as a viewer shows them: EXIF "
                "orientation applied, 16/32-bit scaled to 8 bits, "
                "transparency composited over white)")
_DATA_HELP = "folder:PATH | tfds:NAME | digits (default: the config's)"
_WORKDIR_HELP = ("checkpoints, metrics.jsonl, tb/ and the final model/ (a "
                 "local path or gs://...)")


def _add_run_flags(p, *, batch_what: str, tokens: bool, what: str) -> None:
  """The flags every training command shares (config, data, run, eval,
  mesh); `what` says what the evaluation measures."""
  data = (_DATA_HELP.replace("digits", "digits | tokens:PATH.npz", 1)
          if tokens else _DATA_HELP)
  p.add_argument("--data", help=data + _FOLDER_HELP)
  p.add_argument("--workdir", required=True, help=_WORKDIR_HELP)
  p.add_argument("--steps", type=int, help="run length in optimizer steps "
                 "(schedule horizon; default: the config's)")
  p.add_argument("--global-batch", type=int, help=f"{batch_what} per step, "
                 "over all processes (default: the config's global_batch)")
  p.add_argument("--mesh", help="data=D,fsdp=F over all devices (default: "
                 "data parallel on every device)")
  p.add_argument("--dtype", choices=COMPUTE_DTYPES,
                 help="matmul compute dtype; weights stay float32 (default: "
                 "the config's dtype)")
  p.add_argument("--seed", type=int,
                 help="seed of the initial weights, the per-step random keys "
                 "and the data order and augmentation (default: the "
                 "config's seed, 0 in the bundled configs)")
  p.add_argument("--ckpt-every", type=int, help="steps between checkpoints "
                 "(default: the config's ckpt_every)")
  p.add_argument("--eval-split", metavar="NAME|none",
                 help=f"held-out split evaluated once training ends ({what}; "
                 "val and validation are one split); none skips it "
                 "(default: the config's eval_split)")
  p.add_argument("--eval-batch", type=int, metavar="N",
                 help="examples per evaluation batch, over all processes "
                 "(default: the config's eval_batch)")
  g = p.add_argument_group(
      "multi-process (all three, or none)",
      "Without them a TPU pod or Slurm job is detected; otherwise the run "
      "is one process.")
  g.add_argument("--coordinator-address", help="HOST:PORT of process 0")
  g.add_argument("--num-processes", type=int, metavar="N",
                 help="number of processes in the job")
  g.add_argument("--process-id", type=int, metavar="I",
                 help="this process's index, 0..N-1")


def register(subparsers) -> None:
  p = subparsers.add_parser(
      "train", help="train a VAR transformer (sharded, multi-host, resumable)",
      description="Trains VAR with the official recipe. Re-running the same "
                  "command resumes from the newest checkpoint in --workdir.")
  p.add_argument("--config", required=True,
                 help="a config file (configs/train_d16.py) or a bundled name "
                      "(train_d16, d16, train_tiny)")
  _add_run_flags(p, batch_what="examples", tokens=True,
                 what="loss and accuracy")
  p.add_argument("--remat", choices=REMAT_CHOICES,
                 help="what the backward pass recomputes to save memory: "
                 "none, dots (keep the weight matmuls' outputs), block "
                 "(keep only each block's input) (default: the config's, "
                 "none in the bundled configs)")
  w = p.add_mutually_exclusive_group()
  w.add_argument("--vae-ckpt", metavar="DIR_OR_NAME",
                 help="model directory, or a model name (digits, d16.., "
                 "`var-jax list`), holding the tokenizer")
  w.add_argument("--init-ckpt", metavar="DIR_OR_NAME",
                 help="model directory or name (tokenizer + VAR) to start "
                 "from")
  p.set_defaults(func=_run, kind="var")

  p = subparsers.add_parser(
      "train-vae", help="train a multi-scale VQVAE tokenizer (sharded, "
      "multi-host, resumable)",
      description="Trains the VAR tokenizer (reconstruction + VQ loss, "
                  "optionally LPIPS and a PatchGAN). Re-running the same "
                  "command resumes from the newest checkpoint in --workdir; "
                  "the result, WORKDIR/model, is what `var-jax train "
                  "--vae-ckpt` takes.")
  p.add_argument("--config", required=True,
                 help="a config file (configs/train_vae_digits.py) or a "
                      "bundled name (train_vae_digits, train_vae_imagenet, "
                      "train_vae_tiny)")
  _add_run_flags(p, batch_what="images", tokens=False,
                 what="reconstruction PSNR")
  p.add_argument("--lpips-weights", help="LPIPS VGG weights: FILE.npz or "
                 "VGG16.pth,LPIPS_VGG.pth (torchvision vgg16-397923af.pth "
                 "and lpips' vgg.pth)")
  p.set_defaults(func=_run, kind="vae")
  _register_tokenize(subparsers)
  _register_bench(subparsers)


# Flag -> config field, for the flags that override a config value.
_OVERRIDES = ("data", "steps", "global_batch", "dtype", "seed", "ckpt_every",
              "eval_batch", "vae_ckpt", "init_ckpt", "lpips_weights", "remat")


def _run(args) -> int:
  # Joining the job must happen before anything initialises the backend.
  from var_jax.training import mesh as mesh_lib
  mesh_lib.init_distributed(args.coordinator_address, args.num_processes,
                            args.process_id)
  from var_jax.training.config import TrainConfig, VAETrainConfig, load_config
  if args.kind == "var":
    from var_jax.training.trainer import train as train_fn
    cls = TrainConfig
  else:
    from var_jax.training.vae_trainer import train_vae as train_fn
    cls = VAETrainConfig
  cfg = load_config(args.config, cls)
  kw = {f: getattr(args, f) for f in _OVERRIDES
        if getattr(args, f, None) is not None}
  if args.eval_split is not None:
    if not args.eval_split.strip():
      from var_jax.errors import UserError
      raise UserError("--eval-split needs a split name (val, validation, "
                      "...) or none")
    none = args.eval_split.strip().lower() == "none"
    kw["eval_split"] = None if none else args.eval_split.strip()
  # One weights source: the flag given replaces the config's other one.
  if kw.get("vae_ckpt"):
    kw["init_ckpt"] = None
  if kw.get("init_ckpt"):
    kw["vae_ckpt"] = None
  train_fn(dataclasses.replace(cfg, **kw), args.workdir, mesh_spec=args.mesh)
  return 0


def _register_tokenize(subparsers) -> None:
  p = subparsers.add_parser(
      "tokenize", help="images -> a token cache for `train --data tokens:`",
      description="Encodes a dataset once (center crop, no augmentation) so "
                  "that VAR training skips the tokenizer: `var-jax train "
                  "--data tokens:OUT.npz`.")
  p.add_argument("--ckpt", required=True, metavar="DIR_OR_NAME",
                 help="model directory, or a model name (digits, d16.., "
                 "`var-jax list`), with the tokenizer")
  p.add_argument("--data", required=True, help="folder:PATH | tfds:NAME | "
                 "digits" + _FOLDER_HELP)
  p.add_argument("--split", default="train",
                 help="data split to encode (folder: PATH/SPLIT; val and "
                 "validation are one split)")
  p.add_argument("--out", required=True, help="output .npz")
  p.add_argument("--batch", type=int, default=64,
                 help="images per tokenizer call")
  p.add_argument("--scales", help="comma-separated scale list (default: "
                 "the tokenizer's)")
  p.set_defaults(func=_tokenize)


def _tokenize(args) -> int:
  from var_jax.errors import UserError
  from var_jax.training.tokenize import tokenize_dataset
  if args.batch < 1 or not args.out.endswith(".npz"):
    raise UserError("--batch must be >= 1 and --out must end in .npz")
  scales = None
  if args.scales:
    try:
      scales = tuple(int(v) for v in args.scales.split(","))
    except ValueError:
      raise UserError(f"--scales must be integers, got {args.scales!r}"
                      ) from None
  # n counts the decodable images only (the others are named on stderr).
  n = tokenize_dataset(args.ckpt, args.data, args.split, args.out,
                       batch=args.batch, patch_nums=scales)
  print(f"wrote {n} token sequences to {args.out}")
  return 0


def _register_bench(subparsers) -> None:
  from var_jax.flags import bench_parsers
  from var_jax.training import bench
  bench.add_parser(bench_parsers(subparsers))
