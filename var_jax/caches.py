"""Where var-jax keeps what it learns about this machine between runs.

Two things live under one root (`$XDG_CACHE_HOME/var-jax`, else
`~/.cache/var-jax`): JAX's persistent compilation cache (`jax/`, see
`compile_cache_dir`) and the measured CPU plans of the sampler
(`cpu_plans.json`, written by `var-jax tune`, see
`var_jax.sampling.tuning`). Nothing here is
needed for correctness: deleting the directory only costs time.

A relative `XDG_CACHE_HOME` (including an unexpanded `~/...`) is ignored, as
the XDG Base Directory specification asks; `~` in `VAR_JAX_COMPILE_CACHE`
is expanded, so no `./~/` directory is ever made in the working directory.
"""

from __future__ import annotations

import os

COMPILE_CACHE_ENV = "VAR_JAX_COMPILE_CACHE"
_OFF = ("0", "off", "false", "no", "none")


def cache_root() -> str:
  """`$XDG_CACHE_HOME/var-jax`, else `~/.cache/var-jax` (not created here).

  A relative `XDG_CACHE_HOME` is invalid under the XDG specification and
  ignored.
  """
  base = os.environ.get("XDG_CACHE_HOME", "")
  if not os.path.isabs(base):
    base = os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "var-jax")


def compile_cache_dir() -> str | None:
  """Where compiled programs are kept between runs, or None when turned off.

  `$VAR_JAX_COMPILE_CACHE` names the directory, or turns the cache off with
  `0`/`off`/`false`/`no`; by default `cache_root()/jax`. A leading `~` is
  expanded.
  """
  env = os.environ.get(COMPILE_CACHE_ENV, "").strip()
  if env.lower() in _OFF:
    return None
  return os.path.expanduser(env) if env else os.path.join(cache_root(), "jax")
