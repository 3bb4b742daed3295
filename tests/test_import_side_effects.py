"""Importing or calling var-jax changes no global setting of the process.

A library that flips a framework flag at import, or installs a logging
filter or exception hook when it saves, changes the behaviour of every other
program in the same process. Checked in fresh interpreters: every Flax and
JAX configuration value before and after importing the package and each of
its layers (models, sampling, training, data, convert, eval, the command
line); `sys.unraisablehook` and the filters of the loggers Orbax and asyncio
report through before and after a library save. Only the command line's
`main` installs those.
"""

import json
import subprocess
import sys

_PROBE = r"""
import json, os
import flax, jax

def snapshot():
  fx = {k: getattr(flax.config, k) for k in sorted(flax.config._values)}
  jx = {k: repr(v) for k, v in sorted(jax.config.values.items())}
  env = {k: v for k, v in os.environ.items()
         if k.startswith(("JAX_", "XLA_", "FLAX_", "TF_"))}
  return {"flax": fx, "jax": jx, "env": env}

before = snapshot()
import var_jax
import var_jax.models.var.transformer, var_jax.models.var.vqvae
import var_jax.sampling.var.sampler, var_jax.checkpoint
import var_jax.training.state, var_jax.data.sources, var_jax.convert.var.convert
import var_jax.eval
import var_jax.cli
after = snapshot()
changed = {part: {k: [before[part].get(k), after[part].get(k)]
                  for k in set(before[part]) | set(after[part])
                  if before[part].get(k) != after[part].get(k)}
           for part in before}
print(json.dumps(changed, default=str))
"""


def test_import_leaves_flax_and_jax_settings_alone():
  p = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  changed = json.loads(p.stdout.strip().splitlines()[-1])
  assert changed == {"flax": {}, "jax": {}, "env": {}}, changed


_HOOKS = r"""
import json, logging, sys

def snapshot():
  return {"hook": repr(sys.unraisablehook),
          **{name: [repr(f) for f in logging.getLogger(name).filters]
             for name in ("absl", "asyncio")}}
"""

_SAVE = _HOOKS + r"""
import numpy as np
from var_jax import checkpoint
from var_jax.configs.models import DIGITS_VAE
from var_jax.models.var.config import ModelConfig

before = snapshot()
tree = {"w_CD": np.arange(6, dtype=np.float32).reshape(2, 3)}
checkpoint.save_model(sys.argv[1], ModelConfig("t", DIGITS_VAE), vae=tree)
print(json.dumps([before, snapshot()]))
"""

_CLI = _HOOKS + r"""
from var_jax import cli
before = snapshot()
rc = cli.main(["--no-compile-cache", "encode", "--images", "none.npy",
               "--out", "t.npz", "--batch", "0"])
print(json.dumps([rc, before, snapshot()]))
"""


def _last_json(code: str, *args, cwd=None):
  p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                     text=True, timeout=300, cwd=cwd)
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_library_save_leaves_logging_and_the_unraisable_hook_alone(tmp_path):
  before, after = _last_json(_SAVE, str(tmp_path / "m"))
  assert (tmp_path / "m" / "vae").is_dir()  # The save really ran.
  assert after == before


def test_the_command_line_installs_the_orbax_quieting(tmp_path):
  rc, before, after = _last_json(_CLI, cwd=tmp_path)
  assert rc == 2  # --batch 0: refused, after main set up the process.
  assert after["hook"] != before["hook"]
  for name, kind in (("absl", "_DropOrbaxIoErrors"),
                     ("asyncio", "_DropOrphanedIoFutures")):
    added = [f for f in after[name] if f not in before[name]]
    assert len(added) == 1 and kind in added[0], (name, added)
