"""Fetching files from the Hugging Face Hub, with one-line errors.

Shared by the model families' `download` commands: a file of a repository
(downloaded, or found in the huggingface_hub cache), and the one line that
says why a fetch failed (no network, offline mode, a full disk).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import pathlib
import sys
from typing import Callable

from var_jax.errors import DownloadError, WriteError
from var_jax.io import describe_os_error

_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                errno.EPERM)


def _loaded_types(spec) -> tuple[type, ...]:
  """Classes `module:Name` from modules already imported, others skipped.

  Only modules already in sys.modules can have raised their exceptions, so
  nothing is imported here (requests/httpx may well be absent).
  """
  out = []
  for item in spec:
    mod, name = item.split(":")
    cls = getattr(sys.modules.get(mod), name, None)
    if isinstance(cls, type):
      out.append(cls)
  return tuple(out)


def _network_types() -> tuple[type, ...]:
  """Exceptions that mean huggingface.co could not be reached."""
  return (ConnectionError, TimeoutError) + _loaded_types((
      "huggingface_hub.errors:LocalEntryNotFoundError",
      "httpx:TransportError", "httpx2:TransportError",  # Hub >= 1.0.
      "requests:ConnectionError", "requests:Timeout",  # Hub < 1.0.
      "urllib3.exceptions:HTTPError", "socket:gaierror"))


def fetch_error_types() -> tuple[type, ...]:
  """What a failed fetch may raise (hub, HTTP client or file system)."""
  return (OSError,) + _network_types() + _loaded_types((
      "huggingface_hub.errors:HfHubHTTPError", "huggingface_hub.errors:"
      "XetDownloadError", "httpx:HTTPError", "httpx2:HTTPError",
      "requests:RequestException"))


def _chain(e: BaseException):
  """e and its causes, outermost first (bounded: chains can be cyclic)."""
  for _ in range(8):
    if e is None:
      return
    yield e
    e = e.__cause__ or e.__context__


def _one_line(e: BaseException) -> str:
  text = str(e).strip()
  first = text.splitlines()[0] if text else ""
  return f"{type(e).__name__}: {first}" if first else type(e).__name__


def describe_fetch_error(e: BaseException, what: str) -> str:
  """One line saying why fetching `what` failed and what to do about it."""
  chain = list(_chain(e))
  offline = _loaded_types(("huggingface_hub.errors:OfflineModeIsEnabled",))
  if offline and any(isinstance(x, offline) for x in chain):
    return (f"HF_HUB_OFFLINE is set and {what} is not in the local "
            "huggingface_hub cache; unset HF_HUB_OFFLINE to download it from "
            "huggingface.co (or pass --cache-dir where it is cached)")
  net = _network_types()
  if any(isinstance(x, net) for x in chain):
    # The innermost error names the real cause (DNS, refused, timeout).
    return (f"cannot reach huggingface.co to fetch {what} "
            f"({_one_line(chain[-1])}) and it is not in the local cache; "
            "check the network or proxy, or fetch the files elsewhere and "
            "use `var-jax convert` (`convert-infinity` for Infinity)")
  return f"fetching {what} failed: {_one_line(e)}"


@contextlib.contextmanager
def _quiet_hub_retries():
  """Drops the hub's per-retry warnings (two lines each, five retries).

  Without a network they bury the one-line error that follows; its message
  keeps the innermost cause (DNS, refused, proxy) instead.
  """
  logger = logging.getLogger("huggingface_hub.utils._http")
  drop = lambda record: record.levelno >= logging.ERROR
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


def import_hub():
  try:
    import huggingface_hub
  except ImportError:
    raise DownloadError("downloading needs the huggingface_hub package: "
                        "pip install huggingface_hub") from None
  return huggingface_hub


def _remote_missing(e: BaseException) -> bool:
  """True when the hub answered that the file does not exist (not when it
  could not be asked: an offline cache miss is a network problem)."""
  remote = _loaded_types(("huggingface_hub.errors:RemoteEntryNotFoundError",))
  if remote:
    return isinstance(e, remote)
  entry = _loaded_types(("huggingface_hub.errors:EntryNotFoundError",
                         "huggingface_hub.utils:EntryNotFoundError"))
  local = _loaded_types(("huggingface_hub.errors:LocalEntryNotFoundError",
                         "huggingface_hub.utils:LocalEntryNotFoundError"))
  return isinstance(e, entry) and not (local and isinstance(e, local))


def first_hub_file(repo: str, names, cache_dir, pth_dir) -> pathlib.Path:
  """The first of `names` that the repository holds (e.g. a safetensors
  index, else a PyTorch one).

  Raises:
    DownloadError: it holds none of them, or the hub cannot be reached.
    WriteError: as `hub_file`.
  """
  for name in names:
    found = hub_file(repo, name, cache_dir, pth_dir, missing_ok=True)
    if found is not None:
      return found
  raise DownloadError(f"huggingface.co/{repo} has none of "
                      + ", ".join(names))


def hub_file(repo: str, name: str, cache_dir, pth_dir, *,
             missing_ok: bool = False) -> pathlib.Path | None:
  """One file of a hub repository, downloaded or found in the cache; None
  when `missing_ok` and the hub says the repository has no such file.

  Raises:
    WriteError: the local disk is full or read-only (names the directory).
    DownloadError: the hub cannot be reached or refuses (one line).
  """
  huggingface_hub = import_hub()
  kwargs = {"cache_dir": cache_dir}
  if pth_dir is not None:
    kwargs["local_dir"] = str(pth_dir)
  try:
    with _quiet_hub_retries():
      return pathlib.Path(huggingface_hub.hf_hub_download(repo, name,
                                                          **kwargs))
  except fetch_error_types() + _loaded_types((
      "huggingface_hub.errors:EntryNotFoundError",)) as e:
    if missing_ok and _remote_missing(e):
      return None
    disk = _disk_error(e)
    if disk is not None:
      # A full or read-only disk is the user's to fix, not the network's.
      where = pth_dir or cache_dir or huggingface_hub.constants.HF_HUB_CACHE
      raise WriteError(describe_os_error(disk, where) +
                       f" (fetching {repo}/{name}; a rerun resumes the "
                       "partial download)") from None
    raise DownloadError(describe_fetch_error(e, f"{repo}/{name}")) from None


def _disk_error(e: BaseException) -> OSError | None:
  """The local-disk OSError (full, quota, read-only, denied) behind `e`."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno in _DISK_ERRNOS:
      return x
  return None


def run_fetch(fetch: Callable, what: str, *args):
  try:
    return fetch(*args)
  except WriteError:
    raise
  except fetch_error_types() as e:
    # fetch_files already explains its errors; this covers other fetchers.
    raise DownloadError(describe_fetch_error(e, what)) from None
