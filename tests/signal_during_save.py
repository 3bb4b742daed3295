"""Runs `var-jax ARGS...` with SIGINT while step N is in flight, then
SIGNAL2 while the checkpoint of step N + 1 that this stop makes is being
written.

Usage: python tests/signal_during_save.py N SIGNAL2 ARGS...  (SIGNAL2: INT,
TERM)

Both signals are real ones, sent by the OS to this process: the first as in
signal_at_step.py; the second by a watcher thread, started when the stopping
run calls the save of step N + 1, as soon as Orbax's temporary directory of
that step exists (the worst moment: a half-written checkpoint). The command
runs as the process's own command line (`cli.main()` on sys.argv), as the
`var-jax` script runs it. The wrapper patches this process only; the
training code has no such hook.
"""

import os
import signal
import sys
import threading
import time

from var_jax import cli
from var_jax.training.checkpointing import RunCheckpoints

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from signal_at_step import signal_at_step  # noqa: E402  pylint: disable=wrong-import-position


def _when_written(ckpt_dir, step: int, signum: int) -> None:
  tmp = ckpt_dir / f"{step}.orbax-checkpoint-tmp"
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    if tmp.exists():
      os.kill(os.getpid(), signum)
      print(f"signal_during_save: SIG{signal.Signals(signum).name[3:]} with "
            f"{tmp.name} present", file=sys.stderr)
      return
    time.sleep(0.0005)


def signal_during_save(signum: int, at_step: int) -> None:
  """Sends `signum` once the forced save of step `at_step` has begun
  writing its temporary directory."""
  save = RunCheckpoints.maybe_save

  def maybe_save(self, step, *args, **kw):
    if step == at_step and kw.get("force"):
      threading.Thread(target=_when_written, args=(self.dir, step, signum),
                       daemon=True).start()
    return save(self, step, *args, **kw)

  RunCheckpoints.maybe_save = maybe_save


if __name__ == "__main__":
  at, second = int(sys.argv[1]), getattr(signal, "SIG" + sys.argv[2])
  # Whatever the test runner's children inherit, the signals are not ignored.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  signal_at_step(signal.SIGINT, at)
  signal_during_save(second, at + 1)
  sys.argv[:] = ["var-jax", *sys.argv[3:]]
  sys.exit(cli.main())
