"""Training guarantees (docs/guarantees.md, "Training runs"): one writer per
workdir, resumes see the same data, metrics logs without repeated steps, and
a failed run never becomes a success.

Unit tests on the helpers run in the default suite; the runs (in-process
`run.Run` with a stand-in task, or the real tokenizer task) are `slow`.
"""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from var_jax.errors import TrainingDiverged
from var_jax.locks import LOCK_NAME, DirLock, OutputInUseError, holder_pid

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- one writer

def test_lock_refuses_a_second_writer_naming_the_pid(tmp_path):
  work = tmp_path / "runs" / "w"
  first = DirLock(work, what="--workdir", flag="--workdir").acquire()
  assert (work / LOCK_NAME).read_text() == f"{os.getpid()}\n"
  with pytest.raises(OutputInUseError) as e:
    DirLock(work, what="--workdir", flag="--workdir").acquire()
  assert str(e.value) == (
      f"--workdir {work} is in use by another run (pid {os.getpid()} holds "
      f"{work / LOCK_NAME}); wait for it to finish or pass another "
      "--workdir")
  first.release()
  # Released: the next writer takes it; a directory the lock created and
  # nothing else wrote to is removed with it (a refused run leaves nothing).
  with DirLock(work) as again:
    assert again.held
  assert not (tmp_path / "runs").exists()
  # A directory that holds something stays.
  work.mkdir(parents=True)
  (work / "metrics.jsonl").write_text("")
  with DirLock(work):
    pass
  assert sorted(os.listdir(work)) == ["metrics.jsonl"]


def test_lock_is_not_taken_on_object_stores():
  lock = DirLock("gs://bucket/run").acquire()
  assert not lock.held
  assert holder_pid("gs://bucket/run") is None
  lock.release()


def _holder(work):
  """A process holding `work`'s lock, as a running `train` does."""
  code = ("import sys, time; from var_jax.locks import DirLock; "
          f"DirLock({str(work)!r}).acquire(); print('held', flush=True); "
          "time.sleep(120)")
  p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                       text=True, cwd=ROOT)
  assert p.stdout.readline().strip() == "held"
  return p


@pytest.mark.slow  # Builds the tokenizer task (model state spec).
@pytest.mark.parametrize("command", ["train-vae", "train"])
def test_second_run_on_a_workdir_is_one_line(tmp_path, capsys, command,
                                             random_digits_vae_dir):
  from var_jax import cli
  work = tmp_path / "w"
  holder = _holder(work)
  try:
    args = ([command, "--config", "train_vae_tiny"] if command == "train-vae"
            else [command, "--config", "train_tiny", "--vae-ckpt",
                  str(random_digits_vae_dir)])
    rc = cli.main(args + ["--workdir", str(work), "--steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
  finally:
    holder.kill()
    holder.wait()
  assert rc == 2 and len(err) == 1, err
  assert err[0] == (f"var-jax {command}: error: --workdir {work} is in use by "
                    f"another run (pid {holder.pid} holds {work / LOCK_NAME});"
                    " wait for it to finish or pass another --workdir")
  # Nothing of the workdir was touched.
  assert sorted(os.listdir(work)) == [LOCK_NAME]


@pytest.mark.slow  # Two real training processes.
def test_two_train_processes_on_one_workdir(tmp_path):
  work = tmp_path / "w"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "var_jax.cli", "train-vae", "--config",
         "train_vae_tiny", "--workdir", str(work), "--steps", "4",
         "--eval-split", "none"]
  first = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE,
                           text=True)
  lock = work / LOCK_NAME
  while not (lock.exists() and lock.read_text().strip()):
    assert first.poll() is None, first.stderr.read()
  second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
  _, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-2000:]
  lines = second.stderr.strip().splitlines()
  assert second.returncode == 2 and len(lines) == 1, lines
  assert f"in use by another run (pid {first.pid} holds" in lines[0]
  steps = [json.loads(l)["step"] for l in
           (work / "metrics.jsonl").read_text().splitlines()]
  assert steps == [0, 1, 2, 3]
  assert (work / "model" / "config.json").exists()
  assert not lock.exists()


# ---------------------------------------------------- resumes see same data

def _folder(root, classes, per_class=2):
  for c in classes:
    (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / c / f"{i}.png")
  return root


def _identity(root):
  from var_jax.data.sources import AugConfig, FolderSource
  from var_jax.training.data_identity import identify
  return identify(FolderSource(root, "train", AugConfig(16, train=True)))


def test_data_identity_names_added_and_removed_classes(tmp_path):
  from var_jax.training.data_identity import differences
  root = _folder(tmp_path / "d", ["ant", "cat"])
  before = _identity(root)
  assert before == {"kind": "folder", "classes": ["ant", "cat"], "count": 4,
                    "num_classes": 2}
  assert differences(before, _identity(root)) == []
  _folder(root, ["bee"])
  assert differences(before, _identity(root)) == [
      "class folder(s) added: 'bee'", "examples (checkpoint 4, now 6)"]
  _folder(root, ["ant"], per_class=3)  # One more image in 'ant'.
  import shutil
  shutil.rmtree(root / "cat")
  assert differences(before, _identity(root)) == [
      "class folder(s) added: 'bee'", "class folder(s) removed: 'cat'",
      "examples (checkpoint 4, now 5)"]
  # Checkpoints written before the identity was stored are not compared.
  assert differences({}, _identity(root)) == []


class _Tokens:
  """A token cache as `identify` sees it."""

  def __init__(self, tokens_NL):
    self.tokens_NL, self.num_classes = tokens_NL, 10
    self.labels = np.zeros(len(tokens_NL), np.int32)

  def __len__(self):
    return len(self.labels)


def test_token_cache_identity_is_its_content():
  from var_jax.training.data_identity import differences, identify
  tokens = np.zeros((4, 30), np.int32)
  a = identify(_Tokens(tokens))
  tokens[1, 3] = 7  # Same name, count and shapes; other tokens.
  b = identify(_Tokens(tokens))
  assert a["kind"] == "tokens" and a["count"] == 4
  (diff,) = differences(a, b)
  assert diff.startswith("token cache content (checkpoint ")


@pytest.mark.slow  # A real tokenizer run's state and record.
def test_class_folder_added_before_resume_is_refused(tmp_path, capsys):
  from var_jax import cli
  from var_jax.training import run as run_lib
  from var_jax.training.config import VAETrainConfig, load_config
  from var_jax.training.vae_trainer import VAETask
  root = _folder(tmp_path / "data", ["ant", "cat"], per_class=4)
  work = tmp_path / "w"
  cfg = dataclasses.replace(load_config("train_vae_tiny", VAETrainConfig),
                            data=f"folder:{root}", eval_split=None)
  r = run_lib.Run(cfg, work, VAETask)  # Preempted after saving step 2.
  assert r.record["data"]["classes"] == ["ant", "cat"]
  assert r.ckpts.maybe_save(2, r.state, r.record, force=True)
  r._close(None, quiet=False)
  _folder(root, ["bee"], per_class=4)
  before = sorted(os.listdir(work / "checkpoints"))
  rc = cli.main(["train-vae", "--config", "train_vae_tiny", "--data",
                 f"folder:{root}", "--eval-split", "none", "--workdir",
                 str(work)])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  assert err[0] == (
      f"var-jax train-vae: error: folder:{root} is not the data of the run in "
      f"{work}/checkpoints (step 2): class folder(s) added: 'bee'; examples "
      "(checkpoint 8, now 12); resume with the data it started with, or use "
      "a new --workdir")
  assert sorted(os.listdir(work / "checkpoints")) == before
  assert not (work / "metrics.jsonl").exists()


# ------------------------------------------------------ metrics after resume

def test_metrics_after_resume_do_not_repeat_steps(tmp_path):
  from var_jax.training.metrics import MetricsWriter
  log = tmp_path / "metrics.jsonl"
  # A run killed at step 27 whose newest checkpoint is step 20; its last
  # line was cut by the kill.
  log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n"
                         for s in range(28)) + '{"step": 28, "lo')
  (tmp_path / "tb").mkdir()
  w = MetricsWriter(tmp_path, enabled=True, total_steps=30, start_step=20)
  assert w._tb.purge_step == 20  # TensorBoard hides the old 20..27 events.
  for s in range(20, 30):
    w.write(s, {"loss": 2.0})
  w.close()
  recs = [json.loads(l) for l in log.read_text().splitlines()]
  assert [r["step"] for r in recs] == list(range(30))
  assert [r["loss"] for r in recs[19:21]] == [1.0, 2.0]


def test_metrics_drop_is_atomic_and_only_when_needed(tmp_path):
  from var_jax.training.metrics import drop_steps_from
  log = tmp_path / "metrics.jsonl"
  assert drop_steps_from(log, 3) == 0  # No file: nothing to do.
  log.write_text("".join(f'{{"step": {s}}}\n' for s in range(3)))
  ino = log.stat().st_ino
  assert drop_steps_from(log, 3) == 0 and log.stat().st_ino == ino
  assert drop_steps_from(log, 1) == 2
  assert log.read_text() == '{"step": 0}\n'
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


# ------------------------------------------ a failed run is never a success

def test_state_check_finds_any_non_finite_float():
  from var_jax.training.metrics import check_finite_state
  ok = {"params": {"w": jnp.ones(3)}, "count": jnp.int32(5)}
  check_finite_state(4, ok)
  bad = {"params": {"w": jnp.ones(3).at[1].set(jnp.inf)},
         "count": jnp.int32(5)}
  with pytest.raises(TrainingDiverged, match="non-finite parameters after "
                     "step 4; lower the learning rate"):
    check_finite_state(4, bad)


def _poison_task(bad_step: int | None):
  """A stand-in task: a 4-float state; at `bad_step` the update overflows
  (the state turns non-finite while that step's loss is still finite, as
  a too-large step does); later losses are the state's mean."""
  from var_jax.training import run as run_lib
  from var_jax.training import sharding

  class Task(run_lib.Task):
    command = "train-vae"
    batch_keys = ("images",)

    def __init__(self, cfg, mesh):
      self.model_cfg = cfg.model_config()
      self.patch_nums = self.model_cfg.vae.v_patch_nums
      rep = sharding.replicated(mesh)
      self.spec = types.SimpleNamespace(target={
          "w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=rep)})

    def init_state(self):
      return {"w": jnp.zeros(4)}

    def step(self, state, batch, i):
      loss = jnp.mean(state["w"])
      w = state["w"] + 1.0
      if i == bad_step:
        w = w * jnp.inf
      return {"w": w}, {"loss": loss, "grad_norm": jnp.float32(1.0)}

    def export_trees(self, state):
      return state, None

  return Task


def _tiny_cfg(**kw):
  from var_jax.training.config import VAETrainConfig, load_config
  return dataclasses.replace(load_config("train_vae_tiny", VAETrainConfig),
                             eval_split=None, steps=4, ckpt_every=1,
                             keep_ckpts=10, **kw)


def _saved(work):
  d = work / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) \
      if d.exists() else []


@pytest.mark.slow  # Runs with Orbax saves.
@pytest.mark.parametrize("bad", [0, 2, 3], ids=["first", "middle", "last"])
def test_divergence_is_never_saved_and_the_rerun_says_why(tmp_path, bad):
  from var_jax.training import run as run_lib
  work = tmp_path / "w"
  with pytest.raises(TrainingDiverged) as e:
    run_lib.Run(_tiny_cfg(), work, _poison_task(bad)).run()
  assert str(e.value) == (f"non-finite parameters after step {bad}; lower "
                          "the learning rate or check the data")
  # Checkpoint k holds the state after steps 0..k-1: the bad state would be
  # checkpoint bad + 1.
  assert _saved(work) == list(range(1, bad + 1))
  assert not (work / "model").exists()
  # The same command again: resumes, diverges again, says so.
  with pytest.raises(TrainingDiverged) as again:
    run_lib.Run(_tiny_cfg(), work, _poison_task(bad)).run()
  assert str(again.value) == str(e.value)
  assert not (work / "model").exists()


@pytest.mark.slow  # Orbax saves.
def test_a_saved_non_finite_state_is_not_exported(tmp_path):
  """A workdir whose last checkpoint holds a diverged state (left by a run
  that saved before checking): the rerun refuses instead of exporting."""
  from var_jax.training import run as run_lib
  work = tmp_path / "w"
  r = run_lib.Run(_tiny_cfg(), work, _poison_task(None))
  state = {"w": jnp.full(4, jnp.nan)}
  assert r.ckpts.maybe_save(4, state, r.record, force=True)
  r._close(None, quiet=False)
  with pytest.raises(TrainingDiverged, match="non-finite parameters after "
                     "step 3"):
    run_lib.Run(_tiny_cfg(), work, _poison_task(None)).run()
  assert not (work / "model").exists()


@pytest.mark.slow  # A real tokenizer task, through the command line.
def test_rerun_of_a_diverged_run_is_one_line(tmp_path, capsys):
  from var_jax import cli
  from var_jax.training import run as run_lib
  from var_jax.training.vae_trainer import VAETask
  work = tmp_path / "w"
  cfg = _tiny_cfg()
  r = run_lib.Run(cfg, work, VAETask)
  nan = jax.tree.map(lambda x: x * math.nan if jnp.issubdtype(
      x.dtype, jnp.floating) else x, r.state)
  assert r.ckpts.maybe_save(4, nan, r.record, force=True)
  r._close(None, quiet=False)
  rc = cli.main(["train-vae", "--config", "train_vae_tiny", "--workdir",
                 str(work), "--steps", "4", "--ckpt-every", "1",
                 "--eval-split", "none"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2, err
  assert err[-1] == ("var-jax train-vae: error: non-finite parameters after "
                     "step 3; lower the learning rate or check the data"), err
  assert not (work / "model").exists()
