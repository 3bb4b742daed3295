"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM.

While the step loop runs, the first of these signals only records a request:
the loop finishes the step in flight, saves a checkpoint of it (when its
metrics are finite) and raises `TrainingInterrupted`, whose exit code is the
shell's for that signal (130 for SIGINT, 143 for SIGTERM). A second signal
quits at once without saving (`Interrupted`, a KeyboardInterrupt), except
while a checkpoint is being written (`StopOnSignal.saving`): that save
completes first, so that no half-written checkpoint is left behind. Closing
the run (`held`: waiting for the save under way, stopping Orbax's threads)
is not interrupted either. Outside the loop (start-up, export) a signal
acts as it always does.

A multi-process run must stop every process after the same step, because a
checkpoint save is collective. The process that receives the signal
publishes a stop step a few steps ahead in the job's coordination service
(the key-value store `jax.distributed` runs); every process reads it after
each step. Processes cannot drift that far apart: each step's collectives
make every process wait for the others, and each process blocks on the
previous step's metrics. A stop step past the run's end turns into a stop at
the end, agreed on at a barrier after the loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from var_jax.errors import VarJaxError

# Steps between the step a signal arrives at and the agreed stop step of a
# multi-process run; more than processes can drift apart (see above).
STOP_MARGIN = 8
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(VarJaxError, RuntimeError):
  """A run stopped by SIGINT or SIGTERM; the message says what was saved.

  `exit_code` is 128 + the signal number, as a shell reports a process the
  signal ended (130 for SIGINT, 143 for SIGTERM).
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
    self.exit_code = 128 + signum


class Interrupted(KeyboardInterrupt):
  """A further signal after the stop request: the run quits without saving.

  `signum` is the signal (the command line's exit status is 128 + it).
  """

  def __init__(self, signum: int):
    super().__init__(signal_name(signum))
    self.signum = signum


def _main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def held():
  """SIGINT and SIGTERM are noted but do not interrupt the block.

  For work that must not stop halfway and ends soon by itself (closing a
  run: waiting for the checkpoint under way, stopping Orbax's threads); a
  signal that arrived is then dropped, as the caller is already on its way
  out. Yields the list of signals that arrived. Ignored signals stay
  ignored; off the main thread nothing changes.
  """
  arrived: list[int] = []
  previous = {}
  if _main_thread():
    for s in _SIGNALS:
      if signal.getsignal(s) != signal.SIG_IGN:
        previous[s] = signal.signal(s, lambda signum, _: arrived.append(signum))
  try:
    yield arrived
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


def _coordination_client():
  """The `jax.distributed` key-value client, or None (single process)."""
  try:
    from jax._src import distributed  # The client Orbax uses as well.
  except ImportError:
    return None
  return getattr(distributed.global_state, "client", None)


class StopOnSignal:
  """Context manager: turns SIGINT/SIGTERM into a stop request at a step.

  Args:
    command: names the run in the line printed when a signal arrives.
    process_count: processes of the run; above 1 they agree on the stop
      step through the coordination service.
    key: the coordination-service key of this run's stop step.

  Nothing is installed when the current thread is not the main thread (a
  signal handler can only live there) or when a multi-process run has no
  coordination service: signals then act as they always do. A signal the
  process ignores stays ignored.
  """

  def __init__(self, command: str, *, process_count: int = 1,
               key: str = "var_jax_train_stop"):
    self.command = command
    self.signum: int | None = None
    self._multi = process_count > 1
    self._client = _coordination_client() if self._multi else None
    # Without a coordination service processes cannot agree: no handlers.
    self.active = not self._multi or self._client is not None
    self._key = key
    self._published = False
    self._target: tuple[int, int] | None = None  # (stop step, signal).
    self._previous: dict = {}
    self._saving = 0  # Depth of `saving()` blocks.
    self._again: int | None = None  # A further signal held by `saving()`.

  # ------------------------------------------------------------ handlers
  def __enter__(self) -> "StopOnSignal":
    if self.active and _main_thread():
      for s in _SIGNALS:
        # An ignored signal stays ignored (`nohup`, background jobs).
        if signal.getsignal(s) != signal.SIG_IGN:
          self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    self._restore()

  def _restore(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  @contextlib.contextmanager
  def saving(self, *, then_quit: bool = True):
    """A checkpoint save: a further signal waits until it is complete.

    With `then_quit`, a further signal that arrived meanwhile quits at the
    end of the block (`Interrupted`, unless an exception is already on its
    way); without, the caller decides (the stop's own save is followed by
    `TrainingInterrupted` anyway).
    """
    self._saving += 1
    try:
      yield
    finally:
      self._saving -= 1
    if then_quit and not self._saving and self._again is not None:
      self._quit(self._again)

  def _quit(self, signum: int) -> None:
    self._restore()
    raise Interrupted(signum)

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:  # A further signal: quit without saving,
      if self._saving:  # but not in the middle of a checkpoint.
        self._again = self._again or signum
        return
      self._quit(signum)
    self.signum = signum
    again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
    msg = (f"[{self.command}] {signal_name(signum)}: finishing the current "
           f"step, then saving a checkpoint ({again} again quits without "
           "saving)")
    try:  # os.write: safe whatever the interrupted code was printing.
      tty = sys.stderr.isatty()
      os.write(sys.stderr.fileno(),
               (("\r\x1b[K" if tty else "") + msg + "\n").encode())
    except (OSError, ValueError, AttributeError):
      pass

  # ------------------------------------------------------------ agreement
  def stop_after(self, done: int, total: int) -> int | None:
    """The signal to stop for once `done` steps are complete, else None.

    Call after every step, with the same `done` on every process. A stop
    step at or past `total` is left to `stop_at_end`.
    """
    if not self._multi:
      return self.signum if done < total else None
    if self._client is None:
      return None
    target = self._agreed(done)
    if target is None or target[0] >= total:
      return None
    if done > target[0]:  # Cannot happen while STOP_MARGIN holds.
      raise TrainingInterrupted(
          f"interrupted by {signal_name(target[1])}, but this process was "
          f"already past the agreed stop step {target[0]} (at {done}); "
          "nothing saved by this stop", target[1])
    return target[1] if done == target[0] else None

  def stop_at_end(self) -> int | None:
    """After the loop: the signal to stop for instead of exporting, or None.

    Multi-process: every process waits at a barrier first, so a stop
    published by any of them during the loop is seen by all.
    """
    if not self._multi:
      return self.signum
    if self._client is None:
      return None
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"{self._key}_end")
    target = self._agreed(None)
    return None if target is None else target[1]

  def _agreed(self, done: int | None) -> tuple[int, int] | None:
    if self._target is not None:
      return self._target
    if self.signum is not None and not self._published and done is not None:
      self._published = True
      try:
        self._client.key_value_set(
            self._key, f"{done + STOP_MARGIN}:{self.signum}")
      except Exception:  # Another process published first: theirs holds.
        pass
    try:
      value = self._client.key_value_try_get(self._key)
    except Exception:  # Not published (NOT_FOUND).
      return None
    step, signum = value.split(":")
    self._target = (int(step), int(signum))
    return self._target
