"""Runs `var-jax ARGS...` and SIGKILLs it right after the save of step N starts.

Usage: python tests/kill_at_step.py N ARGS...

The fault the killed-and-resumed training tests need: the process dies with
the asynchronous Orbax save of step N in flight, so that checkpoint may be
incomplete. The wrapper puts the kill into this process's `RunCheckpoints`
only; the training code itself has no such hook.
"""

import os
import signal
import sys

from var_jax import cli
from var_jax.training.checkpointing import RunCheckpoints


def kill_after_save_starts(step: int) -> None:
  """Makes the save of `step` SIGKILL this process once it has started."""
  save = RunCheckpoints.maybe_save

  def maybe_save(self, at, *args, **kwargs):
    started = save(self, at, *args, **kwargs)
    if started and at == step:
      os.kill(os.getpid(), signal.SIGKILL)
    return started

  RunCheckpoints.maybe_save = maybe_save


if __name__ == "__main__":
  kill_after_save_starts(int(sys.argv[1]))
  sys.exit(cli.main(sys.argv[2:]))
