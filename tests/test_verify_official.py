"""`var-jax verify` against the official PyTorch code, end to end.

Needs torch and a checkout of FoundationVision/VAR: `$VAR_TORCH_REPO`, else
`../VAR` beside the repository, else `/tmp/VAR`; skipped without either.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _official_checkout() -> pathlib.Path:
  env = os.environ.get("VAR_TORCH_REPO")
  candidates = [pathlib.Path(env)] if env else [REPO.parent / "VAR",
                                                pathlib.Path("/tmp/VAR")]
  for c in candidates:
    if (c / "models" / "var.py").is_file():
      return c
  pytest.skip("no checkout of FoundationVision/VAR ("
              + (f"VAR_TORCH_REPO={env} has no models/var.py" if env else
                 "set VAR_TORCH_REPO, or clone it to ../VAR or /tmp/VAR")
              + ")")


@pytest.mark.slow  # Runs torch and the official code in a subprocess.
def test_verify_with_vae_and_var_agrees_with_the_official_code(golden_dir):
  pytest.importorskip("torch")
  official = _official_checkout()
  # The command of docs/conversion-and-parity.md, on the golden tiny models.
  p = subprocess.run(
      [sys.executable, "-m", "var_jax.cli", "--no-compile-cache", "verify",
       "--torch-repo", str(official), "--vae", str(golden_dir / "vae_tiny.pth"),
       "--var", str(golden_dir / "var_tiny.pth")],
      capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
  assert "Traceback" not in p.stderr, p.stderr
  # No torch warning about read-only NumPy arrays given to from_numpy.
  assert "not writable" not in p.stderr, p.stderr
  # stdout is the report alone (the official code's prints go to stderr).
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 1, p.stdout
  report = json.loads(lines[0])
  assert p.returncode == 0, (report, p.stderr)
  assert report["ok"] is True, report
  assert report["token_mismatches"] == 0
  assert report["logits_rel_err"] <= report["tolerance"]
  assert report["var_input_rel_err"] <= report["tolerance"]
