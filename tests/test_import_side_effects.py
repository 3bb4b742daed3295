"""Importing var-jax changes no global Flax or JAX setting.

A library that flips a framework flag at import changes the behaviour of
every other program in the same process. Checked in a fresh interpreter:
every Flax and JAX configuration value before and after importing the
package and each of its layers (models, sampling, training, data, convert,
eval, the command line).
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
