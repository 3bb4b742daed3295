"""The `var-jax` command line.

Each area registers its own subcommands (`register(subparsers)` in its
`commands.py`), so this file only wires them together and turns user-facing
errors into one line on stderr and a nonzero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from var_jax.errors import UserError, VarJaxError  # noqa: F401  (UserError re-exported)

# Modules that define subcommands; each has `register(subparsers)`.
_COMMAND_MODULES = (
    "var_jax.convert.commands",
    "var_jax.sampling.commands",
    "var_jax.training.commands",
    "var_jax.training.vae_commands",
    "var_jax.eval.commands",
)


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


def _one_line(e: Exception) -> str:
  text = " ".join(str(e).split())
  return text or type(e).__name__


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "func", None):
    parser.print_help()
    return 2
  try:
    return int(args.func(args) or 0)
  except VarJaxError as e:
    print(f"var-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt:
    print(f"var-jax {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
