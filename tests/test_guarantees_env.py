"""Environment mistakes are one line (docs/guarantees.md#environment).

Cache variables: `~` is expanded, a relative `XDG_CACHE_HOME` is ignored (the
XDG spec). An absent `JAX_PLATFORMS` backend and an out-of-memory are one
line on stderr (subprocesses: slow).
"""

import os
import resource
import subprocess
import sys

import pytest

from var_jax import api, caches


def test_compile_cache_variable_expands_the_home(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv(caches.COMPILE_CACHE_ENV, "~/x")
  assert caches.compile_cache_dir() == str(tmp_path / "x")


def test_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.delenv(caches.COMPILE_CACHE_ENV, raising=False)
  for relative in ("cache", "~/cache", "./c"):
    monkeypatch.setenv("XDG_CACHE_HOME", relative)
    want = tmp_path / ".cache" / "var-jax"
    assert caches.cache_root() == str(want)
    assert caches.compile_cache_dir() == str(want / "jax")
    assert str(api.default_models_dir()) == str(want / "models")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "abs"))
  assert caches.cache_root() == str(tmp_path / "abs" / "var-jax")


def test_models_variable_expands_the_home(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv(api.MODELS_ENV, "~/models")
  assert str(api.default_models_dir()) == str(tmp_path / "models")
