"""`var-jax train-vae`: multi-scale residual VQVAE tokenizer training."""

from __future__ import annotations

import dataclasses
import sys


def register(subparsers) -> None:
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
  p.add_argument("--data", help="folder:PATH | tfds:NAME | digits "
                 "(default: the config's)")
  p.add_argument("--workdir", required=True,
                 help="checkpoints, metrics.jsonl, tb/ and the final model/")
  p.add_argument("--steps", type=int, help="run length in optimizer steps "
                 "(schedule horizon)")
  p.add_argument("--global-batch", type=int, help="images per step, over "
                 "all processes")
  p.add_argument("--mesh", help="data=D,fsdp=F over all devices (default: "
                 "data parallel on every device)")
  p.add_argument("--lpips-weights", help="LPIPS VGG weights: FILE.npz or "
                 "VGG16.pth,LPIPS_VGG.pth (torchvision vgg16-397923af.pth "
                 "and lpips' vgg.pth)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"))
  p.add_argument("--seed", type=int)
  p.add_argument("--ckpt-every", type=int, help="steps between checkpoints")
  g = p.add_argument_group("multi-process (all three, or none)")
  g.add_argument("--coordinator-address", help="HOST:PORT of process 0")
  g.add_argument("--num-processes", type=int)
  g.add_argument("--process-id", type=int)
  p.set_defaults(func=_train_vae)


_OVERRIDES = {"data": "data", "steps": "steps", "global_batch": "global_batch",
              "lpips_weights": "lpips_weights", "dtype": "dtype",
              "seed": "seed", "ckpt_every": "ckpt_every"}


def _train_vae(args) -> int:
  # Joining the job must happen before anything initialises the backend.
  from var_jax.training import mesh as mesh_lib
  mesh_lib.init_distributed(args.coordinator_address, args.num_processes,
                            args.process_id)
  from var_jax.training.metrics import TrainingDiverged
  from var_jax.training.vae_config import load_vae_config
  from var_jax.training.vae_trainer import train_vae
  cfg = load_vae_config(args.config)
  kw = {field: getattr(args, flag) for flag, field in _OVERRIDES.items()
        if getattr(args, flag) is not None}
  cfg = dataclasses.replace(cfg, **kw)
  try:
    train_vae(cfg, args.workdir, mesh_spec=args.mesh)
  except TrainingDiverged as e:
    print(f"var-jax train-vae: error: {e}", file=sys.stderr)
    return 1
  return 0
