"""The `var-jax` command line.

Each area registers its own subcommands (`register(subparsers)` in its
`commands.py`), so this file wires them together, adds what belongs to no
area (`--version`, `list`: `api.catalog`), shows every option's default in
--help, and turns user-facing errors into one line on stderr and a nonzero
exit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import re
import signal
import sys
import threading

from var_jax.errors import UserError, VarJaxError  # noqa: F401  (UserError re-exported)
from var_jax.caches import (COMPILE_CACHE_ENV,  # noqa: F401  (re-exported)
                            compile_cache_dir)

# Modules that define subcommands; each has `register(subparsers)`.
_COMMAND_MODULES = (
    "var_jax.convert.commands",
    "var_jax.sampling.commands",
    "var_jax.training.commands",
    "var_jax.eval.commands",
    "var_jax.planning.commands",
    "var_jax.sampling.infinity.commands",
)


class _HelpFormatter(argparse.HelpFormatter):
  """Shows each option's default after its help text, unless the text
  already names it or there is none to name (None, a flag that is off)."""

  def _get_help_string(self, action):
    text = action.help or ""
    default = action.default
    if (not action.option_strings or default is None or default is False
        or default is argparse.SUPPRESS or "default" in text.lower()):
      return text
    return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
  """argparse with one-line usage errors (exit 2), like every other error,
  and defaults in --help (for every subcommand: they inherit the class)."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", _HelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
  from var_jax import __version__
  parser = _Parser(
      prog="var-jax",
      description="VAR (next-scale prediction) in JAX: convert, sample, edit, "
                  "train.")
  parser.add_argument("--version", action="version",
                      version=f"var-jax {__version__}",
                      help="print the version and exit")
  parser.add_argument(
      "--no-compile-cache", action="store_true",
      help="do not keep compiled programs between runs (default: kept in "
           f"${COMPILE_CACHE_ENV} or ~/.cache/var-jax/jax; "
           f"{COMPILE_CACHE_ENV}=0 also turns it off)")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name in _COMMAND_MODULES:
    # Every listed module ships with the package: a missing one is a broken
    # installation, raised as is, never a command silently left out.
    importlib.import_module(name).register(sub)
  p = sub.add_parser(
      "list", help="presets, training configs, bundled and released models",
      description="Prints, one per line and grouped, the model presets, the "
                  "bundled training configs, the bundled models and the "
                  "released ones, with their parameter counts (and a "
                  "released model's download size). Every model name works "
                  "wherever a model directory is taken (--ckpt, "
                  "--drafter-ckpt).")
  p.set_defaults(func=cmd_list)
  return parser


def cmd_list(args) -> int:
  """`var-jax list`: `api.catalog()`, a heading per group, a line per entry."""
  del args
  from var_jax import api
  groups = api.catalog()
  width = max(len(name) for _, rows in groups for name, _ in rows)
  for i, (heading, rows) in enumerate(groups):
    print(("\n" if i else "") + heading + ":")
    for name, text in rows:
      print(f"  {name:<{width}}  {text}")
  return 0


def enable_compile_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in `path` for this process.

  Every program that took at least a second to compile is stored, so the
  second run of the same command on the same model skips compilation. Done
  here, in the command line's process, never at `import var_jax`.
  """
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class _Terminated(KeyboardInterrupt):
  """SIGTERM, raised where the command is, so that every `finally` (and
  with it the removal of temporaries) runs as for Ctrl-C."""

  signum = signal.SIGTERM


def _raise_terminated(signum, frame):
  del signum, frame
  signal.signal(signal.SIGTERM, signal.SIG_DFL)  # A second one kills.
  raise _Terminated()


def _ignore_signals_while_exiting() -> None:
  """SIGINT and SIGTERM ignored from now on: the command has printed its
  last line and the process is exiting. A signal (a second Ctrl-C) during
  the interpreter's shutdown would otherwise raise KeyboardInterrupt in
  `threading._shutdown` and print a traceback after that line."""
  if threading.current_thread() is not threading.main_thread():
    return
  for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def _sigterm_as_interrupt():
  """SIGTERM handled as SIGINT while a command runs; the previous handler
  is back afterwards. An ignored SIGTERM (nohup) stays ignored; nothing
  is installed off the main thread."""
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN):
    yield
    return
  previous = signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _backend_unavailable(e: BaseException) -> str | None:
  """One line for JAX failing to start the backend `JAX_PLATFORMS` asks for
  (no such device, or no plugin for it), else None."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  in_bridge = tb is not None and tb.tb_frame.f_code.co_filename.endswith(
      "xla_bridge.py")
  text = str(e)
  if not (text.startswith("Unable to initialize backend") or (
      in_bridge and isinstance(e, (RuntimeError, AssertionError)))):
    return None
  if not platforms:
    return f"JAX could not start a backend: {_one_line(e)}"
  cause = text.split(": ", 1)[1] if ": " in text else ""
  cause = cause.split(" (set JAX_PLATFORMS")[0]
  if not cause and isinstance(e, AssertionError):
    cause = "no device of this kind is visible, or its jax plugin is missing"
  cause = f" ({' '.join(cause.split())[:200]})" if cause else ""
  return (f"JAX_PLATFORMS={platforms}: no such backend on this machine"
          f"{cause}; unset JAX_PLATFORMS to use what is here, or set it to "
          "cpu")


def _leave_out_absent_tpu() -> None:
  """With the TPU compiler installed (the `tpu` extra, for `var-jax plan`)
  but no TPU attached, JAX would start a TPU runtime in every command, which
  fails and logs it on stderr: name the platforms there are instead
  (`JAX_PLATFORMS`, for this process). A set `JAX_PLATFORMS` is kept; one
  that asks for a TPU where there is none gets libtpu's lookups of the
  machine switched off, so its failure is our one line only."""
  from var_jax.hardware import tpu_attached  # pylint: disable=import-outside-toplevel
  asked = os.environ.get("JAX_PLATFORMS", "").strip()
  if importlib.util.find_spec("libtpu") is None or tpu_attached():
    return
  if asked:
    if "tpu" in asked.split(","):
      # A TPU asked for where there is none: let libtpu fail without its
      # lookups of the machine's accelerator and workers (each logs lines
      # on stderr); the backend check then reports it in one line.
      from var_jax.planning.topology import COMPILE_ONLY_ENV  # pylint: disable=import-outside-toplevel
      for k, v in COMPILE_ONLY_ENV.items():
        os.environ.setdefault(k, v)
    return
  gpu = any(importlib.util.find_spec(m) is not None
            for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
  platforms = "cuda,cpu" if gpu and os.path.exists("/dev/nvidiactl") else "cpu"
  os.environ["JAX_PLATFORMS"] = platforms  # For child processes.
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_platforms", platforms)  # Read at import: set it.


def _check_backend(args) -> None:
  """Starts JAX's backends now when `JAX_PLATFORMS` names some, so that an
  absent one is one line before any command runs (later, a model load
  would report it as an unreadable checkpoint).

  Commands that may join a multi-process job (`--coordinator-address`) are
  left alone: joining must come before the backends start, and their own
  first device query reports an absent backend the same way.
  """
  if not os.environ.get("JAX_PLATFORMS", "").strip():
    return
  if hasattr(args, "coordinator_address"):
    return
  import jax  # pylint: disable=import-outside-toplevel
  jax.devices()


def _out_of_memory(e: BaseException, args) -> str | None:
  """One line for an allocation that failed (XLA's RESOURCE_EXHAUSTED or
  out-of-memory error, or Python's MemoryError), naming --batch."""
  text = str(e)
  from_xla = type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and (
      "RESOURCE_EXHAUSTED" in text or "Out of memory" in text
      or "out of memory" in text)
  if not (from_xla or isinstance(e, MemoryError)):
    return None
  m = re.search(r"[Oo]ut of memory[^.;\n]*", text)
  cause = f" ({m.group(0).strip()})" if m else ""
  batch = getattr(args, "batch", None)
  if isinstance(batch, int):
    return (f"out of memory with --batch {batch}{cause}; try a smaller "
            "--batch")
  return f"out of memory{cause}; try a smaller batch or a smaller model"


def _one_line(e: Exception) -> str:
  text = " ".join(str(e).split())
  return text or type(e).__name__


def _command_parser(parser, args):
  """The (sub)parser of the command `args` names: `var-jax bench sample`'s
  for that command, so that its usage errors carry its name."""
  for dest in ("command", "bench_command"):
    sub = next((a for a in parser._actions  # pylint: disable=protected-access
                if isinstance(a, argparse._SubParsersAction)), None)  # pylint: disable=protected-access
    name = getattr(args, dest, None)
    if sub is None or name not in sub.choices:
      break
    parser = sub.choices[name]
  return parser


def main(argv=None) -> int:
  parser = build_parser()
  # argparse reports a subcommand's unknown flags from the top parser
  # ("var-jax: error: ..."); they are the subcommand's mistake.
  args, extra = parser.parse_known_args(argv)
  if extra:
    _command_parser(parser, args).error(
        f"unrecognized arguments: {' '.join(extra)}")
  if not getattr(args, "func", None):
    parser.print_help()
    return 2
  # gcsfs logs every exhausted retry with a full traceback; the command
  # reports the failure itself, in one line (io.reachable).
  logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
  # A failed Orbax write echoes from every thread; the command reports it
  # once. Process-wide logging and hook changes: here, never in the library.
  from var_jax import io  # pylint: disable=import-outside-toplevel
  io._install_orbax_quieting()  # pylint: disable=protected-access
  _leave_out_absent_tpu()
  # A command may opt out (plan: compile-only programs cannot be loaded).
  cache = (None if args.no_compile_cache
           or not getattr(args, "compile_cache", True)
           else compile_cache_dir())
  if cache:
    enable_compile_cache(cache)
  try:
    with _sigterm_as_interrupt():
      _check_backend(args)
      return int(args.func(args) or 0)
  except VarJaxError as e:
    print(f"var-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return e.exit_code
  except OSError as e:
    # Disk, permission and network faults outside our own writers: the
    # environment's, not a bug; one line, exit 1 as WriteError.
    print(f"var-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return 1
  except (RuntimeError, AssertionError, MemoryError) as e:
    # The environment's, not a bug: JAX_PLATFORMS naming an absent backend
    # (exit 2, as a bad value), memory exhausted (exit 1).
    line = _backend_unavailable(e)
    code = 2
    if line is None:
      line, code = _out_of_memory(e, args), 1
    if line is None:
      raise
    print(f"var-jax {args.command}: error: {line}", file=sys.stderr)
    return code
  except KeyboardInterrupt as e:
    # Temporaries are gone by now (the writers' `finally`); the exit status
    # is the shell's for the signal.
    signum = getattr(e, "signum", signal.SIGINT)
    print(f"var-jax {args.command}: interrupted by "
          f"{signal.Signals(signum).name}", file=sys.stderr)
    return 128 + signum
  finally:
    if argv is None:  # The process's own command line: it exits next.
      _ignore_signals_while_exiting()


if __name__ == "__main__":
  sys.exit(main())
