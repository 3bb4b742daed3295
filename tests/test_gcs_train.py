"""A training run whose workdir is gs://, killed and resumed, then sampled.

Everything the user names is a `gs://` path in the GCS emulator (the
tokenizer given to `train`, the workdir with its Orbax checkpoints,
metrics.jsonl, TensorBoard events and the exported model, the sample's
outputs); the commands run as subprocesses from an empty directory that must
stay empty. The run is SIGKILLed right after it starts saving step 3
(tests/kill_at_step.py wraps the command), resumed from the newest complete
checkpoint, and must then match, loss for loss and weight for weight, an
uninterrupted run on the local disk.
"""

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from var_jax import checkpoint

STEPS = 4
KILL_AT_STEP = pathlib.Path(__file__).resolve().parent / "kill_at_step.py"


def _var_jax(*args, env, cwd, expect=0, kill_at=None) -> str:
  """`var-jax ARGS`; `kill_at`: SIGKILLed once the save of that step has
  started (tests/kill_at_step.py)."""
  head = (["-m", "var_jax.cli"] if kill_at is None
          else [str(KILL_AT_STEP), str(kill_at)])
  p = subprocess.run([sys.executable, *head, *args], env=env, cwd=cwd,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == expect, p.stderr[-3000:]
  return p.stderr


def _train(workdir, vae, env, cwd, expect=0, kill_at=None) -> str:
  return _var_jax("train", "--config", "train_tiny", "--vae-ckpt", str(vae),
                  "--workdir", str(workdir), "--steps", str(STEPS),
                  "--ckpt-every", "1", env=env, cwd=cwd, expect=expect,
                  kill_at=kill_at)


def _losses(metrics_jsonl: str) -> dict[int, float]:
  """Loss per step; a resumed run's repeated steps keep the last record."""
  out = {}
  for line in metrics_jsonl.splitlines():
    rec = json.loads(line)
    if "loss" in rec:
      out[rec["step"]] = rec["loss"]
  return out


def _var_params(model_dir) -> dict:
  _, _, var = checkpoint.load_model(model_dir)
  return {"/".join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(var))}


@pytest.mark.slow
def test_train_kill_resume_export_and_sample_on_gcs(
    gcs_emulator, gcs_dir, random_digits_vae_dir, tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  env = dict(os.environ, **gcs_emulator.env, JAX_PLATFORMS="cpu",
             VAR_JAX_COMPILE_CACHE=str(tmp_path / "jax_cache"))
  prefix = gcs_dir.split("/", 3)[3]

  # The tokenizer goes into the bucket too: `--vae-ckpt gs://...`.
  cfg, vae, _ = checkpoint.load_model(random_digits_vae_dir, need_var=False)
  checkpoint.save_model(f"{gcs_dir}/vae", cfg, vae=vae)

  # The reference: the same run, uninterrupted, on the local disk.
  local = tmp_path / "local_run"
  _train(local, random_digits_vae_dir, env, cwd)

  run = f"{gcs_dir}/run"
  _train(run, f"{gcs_dir}/vae", env, cwd, expect=-9, kill_at=3)
  steps = {int(n.split("/")[3]) for n in
           gcs_emulator.objects(f"{prefix}/run/checkpoints/")
           if n.split("/")[3].isdigit()}
  assert {1, 2} <= steps, steps  # Saves 1 and 2 finished before the kill.
  assert not gcs_emulator.objects(f"{prefix}/run/model/")  # Not exported yet.

  err = _train(run, f"{gcs_dir}/vae", env, cwd)
  assert "steps 2->4" in err or "steps 3->4" in err, err[-2000:]

  got = _losses(gcs_emulator.read(f"{prefix}/run/metrics.jsonl").decode())
  want = _losses((local / "metrics.jsonl").read_text())
  assert len(want) == STEPS, want
  # Every step's line survives the kill (lines up to the resumed checkpoint
  # come from the killed run), equal to the uninterrupted run.
  assert got == want
  ours, ref = _var_params(f"{run}/model"), _var_params(local / "model")
  assert ours.keys() == ref.keys()
  for k in ref:
    np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
  assert gcs_emulator.objects(f"{prefix}/run/tb/")  # TensorBoard events.

  _var_jax("sample", "--ckpt", f"{run}/model", "--labels", "1,7",
           "--out", f"{gcs_dir}/out/grid.png", env=env, cwd=cwd)
  assert gcs_emulator.objects(f"{prefix}/out/") == [f"{prefix}/out/grid.png"]
  img = Image.open(io.BytesIO(gcs_emulator.read(f"{prefix}/out/grid.png")))
  side = cfg.vae.resolution
  assert img.size == (2 * (side + 2) + 2, side + 4), img.size

  assert sorted(os.listdir(cwd)) == [], "a gs:// path was written locally"
