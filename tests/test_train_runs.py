"""End-to-end `var-jax train` runs in subprocesses (CPU, fake devices).

One 6-step single-device run of a small random model is the reference; runs
on other meshes, two cooperating processes, a run SIGKILLed mid-save and a
run stopped by a full disk, each then resumed, must all reproduce it. These
runs are `slow`.
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def vae_dir(random_digits_vae_dir):
  return random_digits_vae_dir


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  """Runs with the same program (reference, resume) compile it once."""
  global _CACHE
  _CACHE = str(tmp_path_factory.mktemp("jax_cache"))
  yield
  _CACHE = None


_CACHE = None


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  if _CACHE:
    env.update(JAX_COMPILATION_CACHE_DIR=_CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.update(extra)
  return env


def _cmd(workdir, vae_dir, *extra, kill_at=None, signal_at=None,
         steps=STEPS) -> list[str]:
  """The train command; `kill_at`: SIGKILLed once the save of that step
  started (tests/kill_at_step.py); `signal_at`: (SIGNAL, step), that signal
  sent while that step runs (tests/signal_at_step.py)."""
  head = ["-m", "var_jax.cli"]
  if kill_at is not None:
    head = [str(ROOT / "tests" / "kill_at_step.py"), str(kill_at)]
  if signal_at is not None:
    head = [str(ROOT / "tests" / "signal_at_step.py"), signal_at[0],
            str(signal_at[1])]
  return [sys.executable, *head, "train", "--config", "train_tiny",
          "--vae-ckpt", str(vae_dir), "--workdir", str(workdir), "--steps",
          str(steps), *extra]


def _start(workdir, vae_dir, *extra, devices=1, kill_at=None,
           signal_at=None, stderr=subprocess.PIPE, **env) -> subprocess.Popen:
  return subprocess.Popen(_cmd(workdir, vae_dir, *extra, kill_at=kill_at,
                               signal_at=signal_at),
                          env=_env(devices, **env), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=stderr, text=True)


def _finish(p: subprocess.Popen, expect=0) -> str:
  """Waits; returns stderr after checking the exit status."""
  _, err = p.communicate(timeout=600)
  assert p.returncode == expect, err[-3000:]
  return err


def _train(workdir, vae_dir, *extra, devices=1, expect=0, kill_at=None,
           signal_at=None, **env) -> str:
  return _finish(_start(workdir, vae_dir, *extra, devices=devices,
                        kill_at=kill_at, signal_at=signal_at, **env), expect)


def _losses(workdir) -> dict[int, float]:
  """Loss per step; a resumed run's repeated steps keep the last record."""
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    out[rec["step"]] = rec["loss"]
  return out


def _params(workdir) -> dict:
  from var_jax import checkpoint
  _, _, var = checkpoint.load_model(pathlib.Path(workdir) / "model")
  return {"/".join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(var))}


MESHES = ("data=4", "data=2,fsdp=2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, vae_dir):
  """The uninterrupted single-device run."""
  d = tmp_path_factory.mktemp("run")
  _train(d, vae_dir)
  return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory, vae_dir, reference):
  """The reference and the 4-device runs (these two side by side: they
  compile mostly on one core each)."""
  dirs = {m: tmp_path_factory.mktemp("run") for m in MESHES}
  procs = {m: _start(d, vae_dir, "--mesh", m, devices=4)
           for m, d in dirs.items()}
  for p in procs.values():
    _finish(p)
  return {None: reference, **dirs}


@pytest.mark.slow
def test_reference_run_logs(reference):
  recs = [json.loads(l) for l in
          (reference / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in recs] == list(range(STEPS))
  for key in ("loss", "loss_mean", "loss_tail", "acc", "acc_tail",
              "grad_norm", "lr", "wd", "img_per_s", "step_s", "loss_s1",
              "loss_s4", "acc_s4"):
    assert all(np.isfinite(r[key]) for r in recs), key
  assert recs[0]["mfu"] == "n/a"  # CPU: no peak in the table.
  assert recs[0]["lr"] == pytest.approx(3e-4 * 0.005, rel=1e-6)
  assert list((reference / "tb").glob("events.out.tfevents.*"))
  assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == [
      "4", "6"]  # Every 2 steps, newest 2 kept.


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_matches_single_device(runs, mesh):
  ref, got = _losses(runs[None]), _losses(runs[mesh])
  for s in range(3):
    assert got[s] == pytest.approx(ref[s], rel=1e-5), (s, got[s], ref[s])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_device(tmp_path, vae_dir, reference):
  addr = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      _cmd(tmp_path, vae_dir, "--mesh", "data=2,fsdp=2",
           "--coordinator-address", addr, "--num-processes", "2",
           "--process-id", str(i)),
      env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  ref, got = _losses(reference), _losses(tmp_path)
  for s in range(3):
    assert got[s] == pytest.approx(ref[s], rel=1e-5), (s, got[s], ref[s])
  # The exported model directory loads in a single process.
  ref_p, got_p = _params(reference), _params(tmp_path)
  for k in ref_p:
    np.testing.assert_allclose(got_p[k], ref_p[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_sigkill_mid_save_then_resume_is_exact(tmp_path, vae_dir, reference):
  # Killed right after starting the async save of step 4: that checkpoint
  # may be incomplete, so the restart resumes from step 2 or 4.
  _train(tmp_path, vae_dir, expect=-9, kill_at=4)
  done = sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir()
                if d.name.isdigit())
  assert done and max(done) >= 2
  err = _train(tmp_path, vae_dir)
  assert "steps 2->6" in err or "steps 4->6" in err, err
  assert _losses(tmp_path) == _losses(reference)
  ref_p, got_p = _params(reference), _params(tmp_path)
  assert ref_p.keys() == got_p.keys()
  for k in ref_p:
    np.testing.assert_array_equal(got_p[k], ref_p[k], err_msg=k)


def _same_as_reference(workdir, reference) -> None:
  assert _losses(workdir) == _losses(reference)
  ref_p, got_p = _params(reference), _params(workdir)
  assert ref_p.keys() == got_p.keys()
  for k in ref_p:
    np.testing.assert_array_equal(got_p[k], ref_p[k], err_msg=k)


@pytest.mark.slow
def test_sigint_saves_the_step_then_resume_is_exact(tmp_path, vae_dir,
                                                    reference):
  """A real SIGINT while step 2 runs: step 3 is saved (between the periodic
  checkpoints), exit 130 with one line; the same command resumes from step 3
  and ends as the uninterrupted run."""
  err = _train(tmp_path, vae_dir, expect=130, signal_at=("INT", 2))
  assert err.splitlines()[-1] == (
      f"var-jax train: error: interrupted by SIGINT: saved step 3/{STEPS} in "
      f"{tmp_path}/checkpoints; run the same command again to resume from it")
  assert sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir()
                if d.name.isdigit())[-1] == 3
  assert sorted(_losses(tmp_path)) == [0, 1, 2]
  assert not (tmp_path / "model").exists()
  err = _train(tmp_path, vae_dir)
  assert f"steps 3->{STEPS}" in err, err
  _same_as_reference(tmp_path, reference)


@pytest.mark.slow
def test_sigterm_in_the_last_step_then_resume_exports(tmp_path, vae_dir,
                                                      reference):
  err = _train(tmp_path, vae_dir, expect=143, signal_at=("TERM", STEPS - 1))
  assert err.splitlines()[-1].endswith(
      f"interrupted by SIGTERM: saved step {STEPS}/{STEPS} in {tmp_path}/"
      "checkpoints; run the same command again to export the model directory")
  assert not (tmp_path / "model").exists()
  err = _train(tmp_path, vae_dir)
  assert f"steps {STEPS}->{STEPS}" in err, err
  _same_as_reference(tmp_path, reference)


@pytest.mark.slow
def test_two_processes_stop_after_the_same_step(tmp_path, vae_dir):
  """SIGINT to process 1 only, while step 2 runs: both processes stop after
  the step agreed on through the coordination service (3 + STOP_MARGIN),
  save it together and exit 130 with the same line."""
  from var_jax.training.interrupt import STOP_MARGIN
  addr = f"127.0.0.1:{_free_port()}"
  steps, stop = 20, 3 + STOP_MARGIN
  procs = [subprocess.Popen(
      _cmd(tmp_path, vae_dir, "--mesh", "data=2,fsdp=2",
           "--coordinator-address", addr, "--num-processes", "2",
           "--process-id", str(i), "--ckpt-every", "1000", steps=steps,
           signal_at=("INT", 2) if i == 1 else None),
      env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  want = (f"var-jax train: error: interrupted by SIGINT: saved step "
          f"{stop}/{steps} in {tmp_path}/checkpoints; run the same command "
          "again to resume from it")
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 130, err[-3000:]
    assert err.splitlines()[-1] == want, err[-3000:]
  assert [d.name for d in (tmp_path / "checkpoints").iterdir()
          if d.name.isdigit()] == [str(stop)]
  assert sorted(_losses(tmp_path)) == list(range(stop))


@pytest.mark.slow
def test_log_file_gets_whole_lines_and_done_last(tmp_path, vae_dir):
  """stderr to a file: no bar frames (carriage returns, escapes), one line
  per progress report, and the done line after the bar's last report."""
  log = tmp_path / "train.log"
  with open(log, "w") as f:
    p = _start(tmp_path / "w", vae_dir, stderr=f)
    p.communicate(timeout=600)
  text = log.read_text()
  assert p.returncode == 0, text[-3000:]
  assert "\r" not in text and "\x1b" not in text, text
  lines = text.splitlines()
  assert lines[0].startswith(f"[train] train_tiny: steps 0->{STEPS}"), lines
  reports = [l for l in lines if l.startswith("train: ")]
  assert [l.split(" ")[2] for l in reports] == [
      f"{s}/{STEPS}" for s in range(1, STEPS + 1)], lines
  assert all(", loss " in l for l in reports), reports
  assert lines[-2] == reports[-1], lines
  assert lines[-1] == (f"[train] done: {STEPS} steps; model directory "
                       f"{tmp_path / 'w' / 'model'}"), lines


@pytest.mark.slow
def test_eval_split_adds_held_out_metrics(tmp_path, vae_dir):
  """`--eval-split val`: held-out loss and accuracy (eval mode) in the last
  record and one line before the done line."""
  err = _train(tmp_path, vae_dir, "--eval-split", "val", "--eval-batch", "60")
  last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert last["step"] == STEPS - 1
  for k in ("val_loss_mean", "val_acc", "val_loss_tail", "val_acc_tail",
            "val_loss_s1", "val_acc_s4"):
    assert np.isfinite(last[k]), k
  lines = err.splitlines()
  assert lines[-2].startswith("[train] val: loss ") and lines[-2].endswith(
      " over 180 examples"), lines
  assert lines[-1].startswith("[train] done:"), lines


_LAYOUT = """
import dataclasses, jax
from jax.sharding import PartitionSpec as P
from var_jax.training import mesh, optimizer, state
from var_jax.training.config import load_config
cfg = load_config('train_tiny').model_config().var
m = mesh.make_mesh('data=2,fsdp=2')
tx = optimizer.make_optimizer(cfg)
spec = state.var_state_spec(cfg, tx, m)
st = state.init_state(spec, cfg, tx, seed=0)
qkv = st['params']['blocks']['mat_qkv']
assert qkv.sharding.spec == P(None, 'fsdp', None), qkv.sharding
assert qkv.addressable_shards[0].data.shape == (2, 32, 192)
mu = st['opt_state'][1].inner_state.mu['blocks']['mat_qkv']
assert mu.sharding == qkv.sharding, mu.sharding
assert st['opt_state'][1].inner_state.count.sharding.spec == P()
odd = dataclasses.replace(cfg, embed_dim=66)  # 66 % 4: falls back.
m4 = mesh.make_mesh('fsdp=4')
spec = state.var_state_spec(odd, optimizer.make_optimizer(odd), m4)
assert spec.shardings['params']['blocks']['mat_qkv'].spec == P(None, None, None)
assert spec.shardings['params']['head']['kernel'].spec == P(None, None)
print('ok')
"""


def test_sharded_state_layout():
  p = subprocess.run([sys.executable, "-c", _LAYOUT], env=_env(4), cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


@pytest.mark.slow
def test_bench_train_prints_one_json_line():
  p = subprocess.run(
      [sys.executable, "-m", "var_jax.cli", "bench", "train", "--preset",
       "digits", "--batch", "2", "--random-init", "--steps", "1",
       "--warmup", "0", "--no-matmul-peak"],
      env=_env(1), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  lines = p.stdout.strip().splitlines()
  assert len(lines) == 1
  rec = json.loads(lines[0])
  assert rec["bench"] == "train" and rec["batch"] == 2
  assert rec["img_per_s"] > 0 and rec["mfu"] == "n/a"
  assert rec["var_tflop_per_step"] > 0


@pytest.mark.slow
def test_token_cache_run_matches_images(tmp_path, vae_dir, reference):
  """`tokenize` then `train --data tokens:` repeats the image run exactly."""
  from var_jax import cli
  cache = tmp_path / "tok.npz"
  assert cli.main(["tokenize", "--ckpt", str(vae_dir), "--data", "digits",
                   "--out", str(cache), "--batch", "500"]) == 0
  z = np.load(cache)
  assert z["tokens"].shape == (1617, 30) and z["tokens"].dtype == np.int32
  _train(tmp_path / "w", vae_dir, "--data", f"tokens:{cache}")
  ref, got = _losses(reference), _losses(tmp_path / "w")
  assert sorted(got) == sorted(ref)
  for s in ref:
    assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, got[s], ref[s])


def _cache(path, pns=(1, 2, 3, 4), L=None, top=0, **fields):
  """A token cache of 8 sequences (one global batch of train_tiny);
  `fields` add or replace stored arrays."""
  L = sum(p * p for p in pns) if L is None else L
  arrays = dict(tokens=np.full((8, L), top, np.int32),
                labels=np.zeros(8, np.int32), patch_nums=np.asarray(pns),
                num_classes=10, vocab_size=512)
  arrays.update(fields)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return f"tokens:{path}"


def test_token_cache_errors(tmp_path, vae_dir, capsys):
  """A cache the model cannot take is one line naming the field; nothing is
  written. The digits tokenizer: scales 1,2,3,4, vocab 512, 10 classes."""
  from var_jax import cli
  from var_jax.checkpoint import load_config
  assert load_config(vae_dir).vae.vocab_size == 512
  cases = (
      (f"tokens:{tmp_path}/none.npz", "not found"),
      (_cache(tmp_path / "a.npz", L=7), "do not fit scales"),
      (_cache(tmp_path / "b.npz", pns=(1, 2, 3, 5)),
       "patch_nums (1, 2, 3, 5) in the cache, (1, 2, 3, 4) in the model"),
      (_cache(tmp_path / "c.npz", vocab_size=4096),
       "vocab_size 4096 in the cache, 512 in the model"),
      # Written before caches stored vocab_size: the ids are checked.
      (_cache(tmp_path / "d.npz", vocab_size=None, top=600),
       "vocab_size: token ids up to 600 in the cache"),
      (_cache(tmp_path / "e.npz", num_classes=11),
       "num_classes 11 in the cache, 10 in the model"),
  )
  for data, needle in cases:
    rc = cli.main(["train", "--config", "train_tiny", "--vae-ckpt",
                   str(vae_dir), "--workdir", str(tmp_path / "w"),
                   "--data", data])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], (needle, err)
    assert not (tmp_path / "w").exists()
  # An old cache whose ids fit the model is accepted (the run starts).
  from var_jax.data.sources import TokenSource
  from var_jax.training.trainer import resolve_sources, token_cache_differences
  from var_jax.training.config import TrainConfig, load_config as load_run
  cfg = load_run("train_tiny", TrainConfig)
  model = resolve_sources(dataclasses.replace(cfg, vae_ckpt=str(vae_dir))).cfg
  _cache(tmp_path / "f.npz", vocab_size=None, top=511)
  ok = TokenSource(tmp_path / "f.npz")
  assert ok.vocab_size is None
  assert token_cache_differences(ok, model) == []


@contextlib.contextmanager
def _tmpfs(path: pathlib.Path, size: str):
  """A small tmpfs at `path` (root only: skips otherwise)."""
  path.mkdir()
  p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                      str(path)], capture_output=True, text=True)
  if p.returncode:
    pytest.skip(f"cannot mount a tmpfs (needs root): {p.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_full_disk_is_one_line_then_resume_is_exact(tmp_path, vae_dir,
                                                     reference):
  """A disk that holds one checkpoint (2.3 MB) but not two: one line naming
  the path and the cause, exit 1, the step-2 checkpoint intact and no
  temporary directories; after freeing space the rerun repeats the
  uninterrupted run."""
  with _tmpfs(tmp_path / "fs", "3m") as fs:
    work = fs / "w"
    err = _train(work, vae_dir, expect=1)
    lines = [l for l in err.replace("\r", "\n").splitlines()
             if l.strip() and "step/s" not in l and "it/s" not in l]
    assert lines[-1] == ("var-jax train: error: no space left on device "
                         f"writing {work}/checkpoints"), err[-3000:]
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["2"]
    subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)
    err = _train(work, vae_dir)
    assert "steps 2->6" in err, err
    assert _losses(work) == _losses(reference)
    ref_p, got_p = _params(reference), _params(work)
    for k in ref_p:
      np.testing.assert_array_equal(got_p[k], ref_p[k], err_msg=k)
