"""Collaborative decoding on the bundled digits model: quality and speed.

  python tools/digits_code_table.py [--refiner DIR] [--per-class 100]

Rows: the digits VAR alone, the refiner alone, and CoDe with the digits VAR
drafting scales 0..N-1 and the refiner drawing the rest, for every N in
1..K-1. Each row samples `per-class` images of every class (cfg 1.5, top-k
900, top-p 0.96, float32, seed 0; the report's settings) and gives:

- agreement: the share that the independent scikit-learn classifier of
  `var_jax.data.digits_eval` (trained on the real digits) assigns to the
  requested class;
- s/img: wall time per image of the whole compiled program (transformers and
  decoder), after compilation and one untimed warm-up call, in this process,
  for batches of `--batch` (every row the same batch): the fastest of
  `--repeats` passes over all samples, the rows taking turns.

The refiner directory holds a VAR on the digits tokenizer (its own `vae/` is
optional; when present it must equal the bundled tokenizer). Default: the
shipped `var_jax/assets/digits_refiner`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFINER = ROOT / "var_jax" / "assets" / "digits_refiner"


def load_refiner(model_dir, vae):
  """The refiner VAR of `model_dir`, checked against the tokenizer `vae`."""
  from var_jax import checkpoint
  from var_jax.sampling.var import code
  d = pathlib.Path(model_dir)
  if (d / "vae").exists():
    _, own_vae, var = checkpoint.load_model(d, need_var=True)
    code.check_same_tokenizer(vae, own_vae, "digits", "refiner")
    return var
  return checkpoint.load_var(d)


def prepare(vae, var, per_batch, drafter=None, draft_steps=None):
  """The compiled program for one row, after one untimed warm-up call."""
  import jax
  import numpy as np
  from var_jax.sampling.var.sampler import SampleOptions, Sampler
  opts = SampleOptions(cfg=1.5, top_k=900, top_p=0.96,
                       draft_steps=draft_steps)
  run = Sampler(vae, var, opts, drafter=drafter).compile(per_batch)
  # The first execution of an executable pays one-off costs.
  ids = np.arange(per_batch)
  jax.block_until_ready(run(np.zeros(per_batch, np.int32), 0, ids))
  return run


def one_pass(run, labels, per_batch, seed):
  """(images (N, H, W, 3), seconds) of one pass over `labels`."""
  import jax
  import numpy as np
  images = []
  t0 = time.perf_counter()
  for start in range(0, len(labels), per_batch):
    ids = np.arange(start, start + per_batch)
    out = run(labels[start:start + per_batch], seed, ids)
    images.append(np.asarray(jax.block_until_ready(out[1])))
  return np.concatenate(images), time.perf_counter() - t0


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--refiner", type=pathlib.Path, default=REFINER,
                 help="refiner model directory (default: the shipped one)")
  p.add_argument("--per-class", type=int, default=100)
  p.add_argument("--batch", type=int, default=250,
                 help="samples per compiled call; must divide the total")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--repeats", type=int, default=3,
                 help="timed passes per row (the fastest is reported)")
  p.add_argument("--json", type=pathlib.Path, help="also write rows here")
  args = p.parse_args()
  import numpy as np
  from var_jax import checkpoint
  from var_jax.data import digits_eval
  _, vae, big = checkpoint.load_model(None, need_var=True)
  small = load_refiner(args.refiner, vae)
  k = len(big.cfg.patch_nums)
  labels = np.repeat(np.arange(big.cfg.num_classes),
                     args.per_class).astype(np.int32)
  args.batch = min(args.batch, len(labels))
  if len(labels) % args.batch:
    p.error(f"--batch {args.batch} must divide {len(labels)} samples")
  clf, real_acc = digits_eval.train_classifier(vae.cfg.resolution)
  runs = [(f"digits VAR alone (d{big.cfg.depth})",
           prepare(vae, big, args.batch)),
          (f"refiner alone (d{small.cfg.depth})",
           prepare(vae, small, args.batch))]
  runs += [(f"CoDe N={n}", prepare(vae, small, args.batch, drafter=big,
                                   draft_steps=n)) for n in range(1, k)]
  rows = [(name, {"agreement": None, "s_per_img": float("inf")})
          for name, _ in runs]
  # Rows take turns, so a load spike from other processes hits all alike;
  # each row keeps its fastest pass. Every pass draws the same samples.
  for _ in range(args.repeats):
    for (_, run), (_, row) in zip(runs, rows):
      images, dt = one_pass(run, labels, args.batch, args.seed)
      row["agreement"] = round(digits_eval.agreement(clf, images, labels), 4)
      row["s_per_img"] = min(row["s_per_img"], dt / len(labels))
  base = rows[0][1]["s_per_img"]
  print(f"{len(labels)} samples ({args.per_class} per class), cfg 1.5, "
        f"top-k 900, top-p 0.96, float32, seed {args.seed}, batch "
        f"{args.batch}, fastest of {args.repeats} passes; classifier "
        f"{real_acc:.1%} on real held-out digits")
  print("| sampler | class agreement | ms/img | speed vs digits VAR |")
  print("|---|---|---|---|")
  for name, r in rows:
    print(f"| {name} | {r['agreement']:.1%} | {r['s_per_img'] * 1e3:.2f} | "
          f"{base / r['s_per_img']:.2f}x |")
  if args.json:
    args.json.write_text(json.dumps(dict(rows), indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
