"""The command line registers every area's commands, or fails loudly.

`var-jax` is wired from one module per area (`register(subparsers)`); a
module that cannot be imported is a broken installation and must surface as
an error, not as commands that quietly vanish from `var-jax --help`.
"""

import argparse

import pytest

from var_jax import cli


def _commands(parser) -> set[str]:
  sub = next(a for a in parser._actions
             if isinstance(a, argparse._SubParsersAction))
  return set(sub.choices)


def test_every_area_registers_its_commands():
  assert {"convert", "download", "encode", "verify", "sample", "edit",
          "train", "train-vae", "tokenize", "eval"} <= _commands(
              cli.build_parser())


def test_a_missing_command_module_is_an_error(monkeypatch):
  monkeypatch.setattr(cli, "_COMMAND_MODULES",
                      cli._COMMAND_MODULES + ("var_jax.no_such_commands",))
  with pytest.raises(ModuleNotFoundError, match="var_jax.no_such_commands"):
    cli.build_parser()
