"""Runs `var-jax ARGS...` and sends it SIGNAL while step N is in flight.

Usage: python tests/signal_at_step.py SIGNAL N ARGS...   (SIGNAL: INT, TERM)

The signal is a real one, delivered by the OS to this process right after
the trainer has dispatched step N (so it arrives while that step computes),
which makes the step a run stops at deterministic. The wrapper patches the
trainers' `step` in this process only; the training code has no such hook.
"""

import os
import signal
import sys

from var_jax import cli
from var_jax.training.trainer import VARTask
from var_jax.training.vae_trainer import VAETask


def signal_at_step(signum: int, at: int) -> None:
  """Makes both trainers send `signum` to this process once step `at` is
  dispatched."""
  for cls in (VARTask, VAETask):
    def step(self, state, batch, i, _step=cls.step):
      out = _step(self, state, batch, i)
      if i == at:
        os.kill(os.getpid(), signum)
      return out
    cls.step = step


if __name__ == "__main__":
  signum = getattr(signal, "SIG" + sys.argv[1])
  # Whatever the test runner's children inherit, the signal is not ignored.
  signal.signal(signum, signal.default_int_handler
                if signum == signal.SIGINT else signal.SIG_DFL)
  signal_at_step(signum, int(sys.argv[2]))
  sys.exit(cli.main(sys.argv[3:]))
