"""Commands that need an optional package, run where it is not installed.

Each command runs in a child process whose imports of the blocked packages
fail (a meta-path finder put first, as on a machine without them), and must
print one line naming the install command, exit 2, no traceback.
"""

import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `var-jax ARGS...` with the packages named in $BLOCK unimportable.
_WRAPPER = """
import importlib.abc, os, sys
blocked = set(os.environ["BLOCK"].split(","))
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in blocked:
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return None
sys.meta_path.insert(0, Block())
from var_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_without(blocked, argv, cwd):
  env = dict(os.environ, BLOCK=",".join(blocked), VAR_JAX_COMPILE_CACHE="0",
             JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (_ROOT, env.get("PYTHONPATH")) if p)
  return subprocess.run([sys.executable, "-c", _WRAPPER] + list(argv),
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


def _one_line(proc, command):
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith(f"var-jax {command}: error: "), lines[0]
  assert proc.stdout == ""
  return lines[0]


def test_verify_without_torch_is_one_line_with_the_install_command(tmp_path):
  # Neither the checkout nor the .pth exists: torch is the first thing the
  # user has to fix, and the line says how.
  proc = _run_without(["torch"], [
      "verify", "--torch-repo", str(tmp_path / "VAR"), "--vae",
      str(tmp_path / "vae.pth")], tmp_path)
  line = _one_line(proc, "verify")
  assert "torch is not installed" in line
  assert line.endswith(": pip install torch (a CPU wheel is enough: pip "
                       "install torch --index-url "
                       "https://download.pytorch.org/whl/cpu)"), line


def test_verify_library_call_without_torch_raises_verify_error(tmp_path):
  code = _WRAPPER.split("from var_jax.cli")[0] + """
from var_jax.errors import VerifyError, VarJaxError
from var_jax.convert.var.verify import run_verify
try:
  run_verify(sys.argv[1], sys.argv[2])
except VerifyError as e:
  assert isinstance(e, VarJaxError)
  print(e)
  sys.exit(0)
sys.exit(1)
"""
  env = dict(os.environ, BLOCK="torch", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (_ROOT, env.get("PYTHONPATH")) if p)
  proc = subprocess.run(
      [sys.executable, "-c", code, str(tmp_path / "VAR"),
       str(tmp_path / "vae.pth")], cwd=tmp_path, env=env,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "pip install torch" in proc.stdout


@pytest.mark.parametrize("blocked", [["torch"], ["torch_fidelity"]])
def test_bench_eval_official_without_torch_says_so_before_any_work(
    blocked, tmp_path):
  # The weights file does not exist either: the missing package is reported
  # first, before weights are read or anything is timed.
  proc = _run_without(blocked, [
      "bench", "eval", "--official", "--inception",
      str(tmp_path / "nope.pth")], tmp_path)
  line = _one_line(proc, "bench")
  assert f"No module named '{blocked[0]}'" in line, line
  assert line.endswith(": pip install torch && pip install --no-deps "
                       "torch-fidelity"), line
