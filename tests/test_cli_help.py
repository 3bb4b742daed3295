"""What `var-jax` says about itself: help for every option of every
subcommand, defaults in --help, `--version` and `var-jax list`."""

import argparse

import pytest

import var_jax
from var_jax import cli


def _options(parser, path=()):
  """(command path, option action) for every option under `parser`."""
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for name, sub in action.choices.items():
        yield from _options(sub, path + (name,))
    elif not isinstance(action, argparse._HelpAction):
      yield path, parser, action


_PARSER = cli.build_parser()
_ALL = list(_options(_PARSER))


def _id(path, action):
  return " ".join(path + (action.option_strings[-1] if action.option_strings
                          else action.dest,))


@pytest.mark.parametrize("action", [pytest.param(a, id=_id(p, a))
                                    for p, _, a in _ALL])
def test_every_option_has_help(action):
  assert action.help and action.help.strip(), action.option_strings


def test_the_walk_reaches_every_subcommand():
  sub = next(a for a in _PARSER._actions
             if isinstance(a, argparse._SubParsersAction))
  assert {"sample", "sample-many", "edit", "list", "bench", "train",
          "convert"} <= set(sub.choices)
  assert {p for p, _, _ in _ALL} >= {("sample",), ("bench", "sample"),
                                     ("train",), ("train-vae",),
                                     ("tokenize",), ("bench", "train")}


@pytest.mark.parametrize("parser,action", [
    pytest.param(parser, action, id=_id(path, action))
    for path, parser, action in _ALL
    if action.option_strings and not any(
        action.default is v for v in (None, False, argparse.SUPPRESS))])
def test_help_shows_every_default(parser, action):
  text = " ".join(parser._get_formatter()._format_action(action).split())
  assert "default" in text.lower(), text
  if "default" not in action.help.lower():
    assert f"(default: {action.default})" in text, text


def test_sample_help_shows_its_defaults(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["sample-many", "--help"])
  out = capsys.readouterr().out
  assert e.value.code == 0
  assert "samples of each class (default 50" in " ".join(out.split())
  with pytest.raises(SystemExit):
    cli.main(["edit", "--help"])
  out = " ".join(capsys.readouterr().out.split())
  assert "--mode {inpaint,outpaint} inpaint: generate inside the box" in out
  assert "(default inpaint)" in out


def test_version(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--version"])
  assert e.value.code == 0
  assert capsys.readouterr().out.strip() == f"var-jax {var_jax.__version__}"


def test_list_prints_one_line_per_entry_grouped(capsys, monkeypatch,
                                                tmp_path):
  monkeypatch.setenv("VAR_JAX_MODELS", str(tmp_path))
  assert cli.main(["list"]) == 0
  lines = capsys.readouterr().out.rstrip("\n").split("\n")
  headings = [x for x in lines if x and not x.startswith(" ")]
  assert [h.split(" (")[0] for h in headings] == [
      "model presets", "training configs", "bundled models",
      "released models"]
  entries = {x.split()[0]: x for x in lines if x.startswith("  ")}
  assert "digits" in entries and "digits_refiner" in entries
  assert "train_d16" in entries and "tiny" in entries
  # The released d16 (the last group) with its size and download.
  assert entries["d16"].split(None, 1)[1] == (
      "VAR 310M + tokenizer 109M parameters; 256px, 1000 classes, depth 16; "
      "download about 1.7 GB")
  # Names line up in one column.
  assert len({x.index(x.split()[1]) for x in lines if x.startswith("  ")}) == 1
