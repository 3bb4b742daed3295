"""`var-jax download`: fetch the released checkpoints and convert them.

The fetch (huggingface_hub, repository FoundationVision/var) is the only part
that needs the network; everything after it is `convert_files` on local
paths, so `download(..., fetch=...)` takes any function that returns them.
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

REPO = "FoundationVision/var"
VAE_FILE = "vae_ch160v4096z32.pth"
MODELS = ("d16", "d20", "d24", "d30", "d36")
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                errno.EPERM)


def checkpoint_files(model: str) -> tuple[str, str]:
  """(VQVAE file, VAR file) in the hub repository for a released model."""
  if model not in MODELS:
    raise DownloadError(f"unknown model {model!r}; released: "
                        f"{', '.join(MODELS)}")
  return VAE_FILE, f"var_{model}.pth"


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
            "check the network or proxy, or fetch the .pth files elsewhere "
            "and use `var-jax convert`")
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


def fetch_files(model: str, cache_dir=None,
                pth_dir=None) -> tuple[pathlib.Path, pathlib.Path]:
  """Downloads (or finds in the hub cache) the model's two .pth files.

  Args:
    model: d16, d20, d24, d30 or d36.
    cache_dir: huggingface_hub cache directory (default: its own).
    pth_dir: if given, the files are written here as plain files instead.

  Returns:
    (VQVAE path, VAR path).
  """
  try:
    import huggingface_hub
  except ImportError:
    raise DownloadError("downloading needs the huggingface_hub package: "
                        "pip install huggingface_hub") from None
  paths = []
  for name in checkpoint_files(model):
    kwargs = {"cache_dir": cache_dir}
    if pth_dir is not None:
      kwargs["local_dir"] = str(pth_dir)
    try:
      with _quiet_hub_retries():
        paths.append(pathlib.Path(huggingface_hub.hf_hub_download(
            REPO, name, **kwargs)))
    except fetch_error_types() as e:
      disk = _disk_error(e)
      if disk is not None:
        # A full or read-only disk is the user's to fix, not the network's.
        where = pth_dir or cache_dir or huggingface_hub.constants.HF_HUB_CACHE
        raise WriteError(describe_os_error(disk, where) +
                         f" (fetching {REPO}/{name}; a rerun resumes the "
                         "partial download)") from None
      raise DownloadError(describe_fetch_error(e, f"{REPO}/{name}")) from None
  return paths[0], paths[1]


def _disk_error(e: BaseException) -> OSError | None:
  """The local-disk OSError (full, quota, read-only, denied) behind `e`."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno in _DISK_ERRNOS:
      return x
  return None


def download(model: str, out, *, cache_dir=None, pth_dir=None,
             overwrite: bool = False, preset: str | None = None,
             fetch: Callable | None = None, log=print):
  """Fetches and converts one released model into the model directory `out`.

  Args:
    model: d16, d20, d24, d30 or d36.
    out: output model directory (refused if it exists, unless overwrite).
    cache_dir: huggingface_hub cache directory (default: its own).
    pth_dir: keep the .pth files as plain files in this directory.
    overwrite: replace an existing `out`.
    preset: the preset the files must match (default: `model`; tests pass
      `tiny` with small local files).
    fetch: `(model, cache_dir, pth_dir) -> (vae_path, var_path)`;
      default `fetch_files`.
    log: progress lines.

  Returns:
    The written ModelConfig.
  """
  from var_jax import checkpoint
  from var_jax.config import get_preset
  from var_jax.convert.convert import convert_files
  # Every check that needs no network comes before the (large) download.
  checkpoint_files(model)
  preset = preset or model
  try:
    get_preset(preset)
  except ValueError as e:
    raise DownloadError(str(e)) from None
  from var_jax.io import as_path, is_local
  if as_path(out).exists() and not overwrite:
    raise checkpoint.CheckpointError(
        f"{out} already exists; pass --overwrite to replace it")
  if pth_dir is not None and not is_local(pth_dir):
    raise DownloadError(f"--pth-dir must be a local directory (the hub "
                        f"writes it), got {pth_dir}")
  if pth_dir is not None and is_local(out) and (
      pathlib.Path(pth_dir).expanduser().resolve()
      == pathlib.Path(out).expanduser().resolve()):
    raise DownloadError("--pth-dir must differ from --out")
  log(f"fetching {model} from huggingface.co/{REPO}")
  try:
    vae_path, var_path = (fetch or fetch_files)(model, cache_dir, pth_dir)
  except WriteError:
    raise
  except fetch_error_types() as e:
    # fetch_files already explains its errors; this covers other fetchers.
    raise DownloadError(describe_fetch_error(e, f"{REPO} ({model})")) from None
  return convert_files(vae_path, var_path, out, preset=preset,
                       overwrite=overwrite, log=log)
