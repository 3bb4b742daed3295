"""SIGINT/SIGTERM during a run: finish the step, save it, exit 130/143.

In-process runs of `train_vae_tiny` (8 steps, a checkpoint every 2) whose
step sends this process a real signal; the subprocess versions, with the
resumed run compared to an uninterrupted one, are in test_train_runs.py and
test_train_vae.py.
"""

import dataclasses
import json
import os
import signal
import threading

import jax.numpy as jnp
import pytest

from var_jax.training import run as run_lib
from var_jax.training.config import VAETrainConfig, load_config
from var_jax.training.interrupt import TrainingInterrupted
from var_jax.training.vae_trainer import VAETask

pytestmark = [
    pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                       reason="signal handlers live in the main thread"),
    pytest.mark.usefixtures("signals_at_defaults"),
]


def _task(signal_at: int, signum: int, nan_at: int | None = None):
  class Task(VAETask):
    def step(self, state, batch, i):
      state, m = super().step(state, batch, i)
      if i == nan_at:
        m = dict(m, loss=jnp.float32(jnp.nan))
      if i == signal_at:
        os.kill(os.getpid(), signum)
      return state, m
  return Task



def _run(workdir, **kw):
  cfg = dataclasses.replace(load_config("train_vae_tiny", VAETrainConfig),
                            eval_split=None)
  before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
  with pytest.raises(TrainingInterrupted) as e:
    run_lib.Run(cfg, workdir, _task(**kw)).run()
  after = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
  assert after == before  # The run's handlers are gone.
  return e.value


def _saved(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit())


def _logged(workdir):
  return [json.loads(l)["step"] for l in
          (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # Interrupted and resumed training run.
def test_sigint_saves_the_step_in_flight(tmp_path, capfd):
  work = tmp_path / "w"
  e = _run(work, signal_at=2, signum=signal.SIGINT)
  assert e.exit_code == 130
  assert str(e) == (f"interrupted by SIGINT: saved step 3/8 in "
                    f"{work}/checkpoints; run the same command again to "
                    "resume from it")
  assert _saved(work) == [2, 3]  # Periodic 2, and the stop.
  assert _logged(work) == [0, 1, 2]  # Every saved step's line is written.
  assert not (work / "model").exists()
  err = capfd.readouterr().err.splitlines()  # The handler writes to fd 2.
  assert any(l.startswith("[train-vae] SIGINT: finishing the current step")
             for l in err), err
  # Resumed: from the saved step, to the end.
  cfg = load_config("train_vae_tiny", VAETrainConfig)
  r = run_lib.Run(dataclasses.replace(cfg, eval_split=None), work, VAETask)
  assert r.start == 3
  r.run()
  assert _logged(work) == list(range(8))
  assert (work / "model" / "config.json").exists()


@pytest.mark.slow
def test_sigterm_in_the_last_step_saves_it_and_skips_export(tmp_path):
  work = tmp_path / "w"
  e = _run(work, signal_at=7, signum=signal.SIGTERM)
  assert e.exit_code == 143
  assert "saved step 8/8" in str(e) and "export the model directory" in str(e)
  assert _saved(work)[-1] == 8 and not (work / "model").exists()


@pytest.mark.slow
def test_non_finite_step_is_not_saved(tmp_path):
  work = tmp_path / "w"
  e = _run(work, signal_at=2, signum=signal.SIGINT, nan_at=2)
  assert e.exit_code == 130
  assert str(e) == ("interrupted by SIGINT; step 3 not saved: non-finite loss"
                    " (nan) at step 2; lower the learning rate or check the "
                    "data; the newest checkpoint is step 2")
  assert _saved(work) == [2]
