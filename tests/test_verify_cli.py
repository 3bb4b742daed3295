"""Commands that need an optional package, run where it is not installed.

Each command runs with imports of the blocked packages failing (a meta-path
finder put first and the packages dropped from `sys.modules`, as on a
machine without them; both restored afterwards), and must print one line
naming the install command, exit 2, no traceback.
"""

import importlib.abc
import sys

import pytest

from var_jax import cli


class _Block(importlib.abc.MetaPathFinder):
  """Makes every import of the named top-level packages fail."""

  def __init__(self, names):
    self.names = set(names)

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name.split(".")[0] in self.names:
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return None


@pytest.fixture
def without(monkeypatch):
  """`without(*packages)`: those packages are not importable in this test."""
  def block(*names):
    for mod in list(sys.modules):
      if mod.split(".")[0] in names:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(sys, "meta_path", [_Block(names), *sys.meta_path])
  return block


def _run(capsys, argv):
  code = cli.main(["--no-compile-cache", *argv])
  out, err = capsys.readouterr()
  return code, out, err


def _one_line(result, command):
  code, out, err = result
  assert code == 2, err
  assert "Traceback" not in err, err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith(f"var-jax {command}: error: "), lines[0]
  assert out == ""
  return lines[0]


def test_verify_without_torch_is_one_line_with_the_install_command(
    capsys, tmp_path, without):
  # Neither the checkout nor the .pth exists: torch is the first thing the
  # user has to fix, and the line says how.
  without("torch")
  line = _one_line(_run(capsys, [
      "verify", "--torch-repo", str(tmp_path / "VAR"), "--vae",
      str(tmp_path / "vae.pth")]), "verify")
  assert "torch is not installed" in line
  assert line.endswith(": pip install torch (a CPU wheel is enough: pip "
                       "install torch --index-url "
                       "https://download.pytorch.org/whl/cpu)"), line


def test_verify_library_call_without_torch_raises_verify_error(
    tmp_path, without):
  from var_jax.convert.var.verify import run_verify
  from var_jax.errors import VarJaxError, VerifyError
  without("torch")
  with pytest.raises(VerifyError, match="pip install torch") as info:
    run_verify(str(tmp_path / "VAR"), str(tmp_path / "vae.pth"))
  assert isinstance(info.value, VarJaxError)


@pytest.mark.parametrize("blocked", ["torch", "torch_fidelity"])
def test_bench_eval_official_without_torch_says_so_before_any_work(
    blocked, capsys, tmp_path, without):
  # The weights file does not exist either: the missing package is reported
  # first, before weights are read or anything is timed.
  without(blocked)
  line = _one_line(_run(capsys, [
      "bench", "eval", "--official", "--inception",
      str(tmp_path / "nope.pth")]), "bench")
  assert f"No module named '{blocked}'" in line, line
  assert line.endswith(": pip install torch && pip install --no-deps "
                       "torch-fidelity"), line
