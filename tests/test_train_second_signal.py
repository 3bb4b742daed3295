"""A second SIGINT/SIGTERM after the first one stopped a training run.

The first signal asks the run to finish its step and save it; a further one
quits at once, except while a checkpoint is being written: that save
completes (no half-written `*.orbax-checkpoint-tmp` left behind), and the
command still ends with its one line. Unit tests of `interrupt` in this
process; the real run in a subprocess (slow).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading

import pytest

from var_jax.training import interrupt

ROOT = pathlib.Path(__file__).resolve().parents[1]

in_main_thread = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers live in the main thread")


def _send(signum):
  os.kill(os.getpid(), signum)  # The handler runs before os.kill returns.


@in_main_thread
def test_a_second_signal_during_a_save_waits_for_it(signals_at_defaults,
                                                     capfd):
  before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
  stop = interrupt.StopOnSignal("train")
  with stop:
    _send(signal.SIGINT)  # The stop request.
    assert stop.stop_after(1, 10) == signal.SIGINT
    with pytest.raises(interrupt.Interrupted) as e:
      with stop.saving():
        _send(signal.SIGTERM)  # Held: the block runs to its end.
        finished = True
    assert finished and e.value.signum == signal.SIGTERM
  assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)
          ] == before
  assert capfd.readouterr().err.count("SIGINT: finishing the current step") == 1


@in_main_thread
def test_the_stops_own_save_is_not_cut_short(signals_at_defaults, capfd):
  stop = interrupt.StopOnSignal("train")
  with stop:
    _send(signal.SIGINT)
    with stop.saving(then_quit=False):
      _send(signal.SIGINT)
      _send(signal.SIGTERM)
    # Then TrainingInterrupted is raised by the caller, not Interrupted.
  capfd.readouterr()


@in_main_thread
def test_a_second_signal_outside_a_save_quits_at_once(signals_at_defaults,
                                                      capfd):
  stop = interrupt.StopOnSignal("train")
  with pytest.raises(interrupt.Interrupted) as e:
    with stop:
      _send(signal.SIGINT)
      _send(signal.SIGINT)
      pytest.fail("not interrupted")
  assert isinstance(e.value, KeyboardInterrupt)
  assert e.value.signum == signal.SIGINT
  capfd.readouterr()


@in_main_thread
def test_held_notes_signals_and_restores_the_handlers(signals_at_defaults):
  before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
  with interrupt.held() as arrived:
    _send(signal.SIGINT)
    _send(signal.SIGTERM)
  assert arrived == [signal.SIGINT, signal.SIGTERM]
  assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)
          ] == before


def _train(workdir, *wrapper) -> subprocess.CompletedProcess:
  head = [str(ROOT / "tests" / w) for w in wrapper[:1]] + list(wrapper[1:])
  return subprocess.run(
      [sys.executable, *(head or ["-m", "var_jax.cli"]), "train", "--config",
       "train_tiny", "--data", "digits", "--vae-ckpt", "digits", "--steps",
       "20", "--global-batch", "8", "--workdir", str(workdir)],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
      # The wrapper un-ignores the signals itself (a background job starts
      # with SIGINT ignored, and a run keeps an ignored signal ignored).
      env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.slow  # Two training runs in subprocesses.
@pytest.mark.parametrize("second", ["INT", "TERM"])
def test_a_second_signal_during_the_stops_save(second, tmp_path):
  pytest.importorskip("sklearn")  # The digits data.
  work = tmp_path / "w"
  # SIGINT at step 12; `second` while checkpoint 13 is being written.
  p = _train(work, "signal_during_save.py", "12", second)
  assert "with 13.orbax-checkpoint-tmp present" in p.stderr, p.stderr
  assert p.returncode == 130, p.stderr
  for bad in ("Traceback", "Exception ignored", "ERROR"):
    assert bad not in p.stderr, p.stderr
  own = [l for l in p.stderr.splitlines()
         if not l.startswith(("[train]", "train:", "signal_during_save:"))]
  assert own == [f"var-jax train: error: interrupted by SIGINT: saved step "
                 f"13/20 in {work}/checkpoints; run the same command again "
                 "to resume from it"], p.stderr
  assert not [str(x) for x in work.rglob("*tmp*")]
  assert sorted(int(d.name) for d in (work / "checkpoints").iterdir()) == [
      12, 13]
  # Resumed from the complete checkpoint of step 13, to the end.
  r = _train(work)
  assert r.returncode == 0, r.stderr
  assert "steps 13->20" in r.stderr, r.stderr
  steps = [json.loads(l)["step"]
           for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert steps == list(range(20)), steps
  assert (work / "model" / "config.json").exists()


# `var-jax list` as the process's own command line, with a non-daemon thread
# that sends SIGNAL once the command has returned: the interpreter's shutdown
# (threading._shutdown) waits for that thread while the signal arrives.
_SIGNAL_WHILE_EXITING = r"""
import os, signal, sys, threading
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
from var_jax import cli
signum = getattr(signal, "SIG" + sys.argv[1])
done = threading.Event()
def late():
  done.wait()
  os.kill(os.getpid(), signum)
threading.Thread(target=late).start()
sys.argv[:] = ["var-jax", "list"]
try:
  rc = cli.main()
finally:
  done.set()
sys.exit(rc)
"""


@pytest.mark.slow  # A subprocess.
@pytest.mark.parametrize("name", ["INT", "TERM"])
def test_a_signal_while_the_process_exits_is_ignored(name):
  p = subprocess.run([sys.executable, "-c", _SIGNAL_WHILE_EXITING, name],
                     capture_output=True, text=True, timeout=120, check=False)
  assert p.returncode == 0, p.stderr
  assert p.stderr == "", p.stderr
  assert p.stdout.startswith("model presets"), p.stdout
