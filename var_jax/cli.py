"""The `var-jax` command line.

Each area registers its own subcommands (`register(subparsers)` in its
`commands.py`), so this file only wires them together and turns user-facing
errors into one line on stderr and a nonzero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define subcommands; each has `register(subparsers)`.
_COMMAND_MODULES = (
    "var_jax.convert.commands",
    "var_jax.sampling.commands",
    "var_jax.training.commands",
    "var_jax.training.vae_commands",
)


class UserError(Exception):
  """An error caused by the user's input: printed as one line, exit code 2."""


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
  src.add_argument("--ckpt", help="model directory to take the weights from")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="var-jax",
      description="VAR (next-scale prediction) in JAX: convert, sample, edit, "
                  "train.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name in _COMMAND_MODULES:
    try:
      mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name != name:
        raise
      continue
    mod.register(sub)
  return parser


def _user_error_types():
  from var_jax.checkpoint import CheckpointError
  from var_jax.convert.load import ConvertError
  from var_jax.convert.pth import PthError
  types = [UserError, CheckpointError, ConvertError, PthError,
           FileNotFoundError]
  try:
    from var_jax.data import DataError
    types.append(DataError)
  except ImportError:
    pass
  return tuple(types)


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 2
  try:
    return int(args.func(args) or 0)
  except _user_error_types() as e:
    print(f"var-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"var-jax {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
