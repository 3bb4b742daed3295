"""CLI: `var-jax eval` (FID, sFID, IS, precision, recall) and `bench eval`."""

from __future__ import annotations

import argparse
import json
import sys

from var_jax.models.var.config import COMPUTE_DTYPES


def register(sub) -> None:
  p = sub.add_parser(
      "eval", help="FID, sFID, IS, precision, recall (the ADM evaluator)",
      description="Scores a sample batch the way openai/guided-diffusion's "
                  "evaluator does (TF 2015-12-05 InceptionV3, in JAX). "
                  "Prints one JSON line on stdout and a table on stderr.")
  p.add_argument("samples", help="ADM .npz (arr_0 uint8 (N, H, W, 3), as "
                 "sample-many writes) or a folder of PNG/JPEG images. Images "
                 "are read as a viewer shows them: EXIF orientation applied, "
                 "16/32-bit images scaled to 8 bits, palette/CMYK/gray "
                 "converted, transparency composited over white.")
  p.add_argument("--ref", help="reference batch: ADM .npz (arr_0 and/or "
                 "precomputed mu, sigma, mu_s, sigma_s, e.g. "
                 "VIRTUAL_imagenet256_labeled.npz) or an image folder")
  p.add_argument("--metrics", default=None,
                 help="comma-separated subset of is,fid,sfid,precision,recall"
                      " (pr = precision,recall; default all with --ref, the "
                      "Inception Score alone without)")
  p.add_argument("--inception", help="torch-fidelity's "
                 "weights-inception-2015-12-05-6726825d.pth (or pytorch-fid's "
                 "pt_inception-2015-12-05-6726825d.pth); default "
                 "$VAR_JAX_INCEPTION or torch hub's checkpoint folder")
  p.add_argument("--batch", type=int, default=64,
                 help="images per step over all local devices (default 64)")
  p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32",
                 help="activation dtype (float32 for the reference numbers)")
  p.add_argument("--sample-cache", help="npz to keep the samples' features "
                 "in (read if present, written otherwise)")
  p.add_argument("--ref-cache", help="npz to keep the reference features in")
  p.add_argument("--out", help="also write the JSON result to this file")
  p.add_argument("--no-progress", action="store_true",
                 help="no progress bar")
  p.set_defaults(func=cmd_eval)

  from var_jax.eval import bench
  from var_jax.flags import bench_parsers
  bench.add_parser(bench_parsers(sub))


def inception_path(arg):
  """--inception, else a default location; a missing file is an error."""
  from var_jax.convert import inception as ci
  from var_jax.errors import InceptionWeightsError
  path = arg or ci.default_weights_path()
  if path is None:
    raise InceptionWeightsError(ci.missing_file_message(
        "(none given; --inception or $VAR_JAX_INCEPTION)"))
  return path


def cmd_eval(args: argparse.Namespace) -> int:
  import jax.numpy as jnp

  from var_jax.convert import inception as ci
  from var_jax.eval import features, suite
  plan = suite.plan(args.samples, args.ref, args.metrics,
                    sample_cache=args.sample_cache, ref_cache=args.ref_cache)
  model = ci.load_inception(inception_path(args.inception),
                            dtype=jnp.dtype(args.dtype))
  extractor = features.FeatureExtractor(model, batch=args.batch)
  result = suite.run(plan, extractor, progress=not args.no_progress)
  line = json.dumps(result, sort_keys=False)
  import jax
  if jax.process_index() == 0:
    if args.out:
      from var_jax.io import write_text
      write_text(args.out, line + "\n")
    print(suite.table(result), file=sys.stderr)
    note = suite.ref_note(plan)
    if note:
      print(note, file=sys.stderr)
    print(line, flush=True)
  return 0
