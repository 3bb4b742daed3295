"""Command-line pieces shared by several areas' `commands.py` modules.

Only command modules (the layer just under `cli.py`) import this file; the
library layers below never see argparse.
"""

from __future__ import annotations


def bench_parsers(subparsers):
  """The sub-parsers of `var-jax bench`, created by whichever area asks first."""
  parser = subparsers.choices.get("bench")
  if parser is None:
    parser = subparsers.add_parser(
        "bench", help="benchmarks (one JSON line each)",
        description="Benchmarks that print one JSON line of figures.")
    sub = parser.add_subparsers(dest="bench_command", metavar="WHAT")
    parser.set_defaults(func=lambda _: parser.print_help() or 2)
    parser.var_jax_sub = sub
  return parser.var_jax_sub


def add_bench_model_args(p) -> None:
  """--preset and the required choice of --random-init or --ckpt."""
  p.add_argument("--preset", default="d16", help="model preset (default d16)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--random-init", action="store_true",
                   help="random weights for the VAR and the tokenizer")
  src.add_argument("--ckpt", metavar="DIR_OR_NAME",
                   help="model directory, or a model name (digits, d16.., "
                        "`var-jax list`), to take the weights from")


def add_batch_dtype_args(p, *, batch: int, batch_help: str,
                         dtype_help: str) -> None:
  """--batch (default `batch`) and --dtype (float32 | bfloat16, default
  float32): how much and in what precision a benchmark (or eval) computes."""
  p.add_argument("--batch", type=int, default=batch, help=batch_help)
  from var_jax.models.var.config import COMPUTE_DTYPES
  p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32",
                 help=dtype_help)
