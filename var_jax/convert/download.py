"""`var-jax download`: fetch the released checkpoints and convert them.

The fetch (huggingface_hub, repository FoundationVision/var) is the only part
that needs the network; everything after it is `convert_files` on local
paths, so `download(..., fetch=...)` takes any function that returns them.
"""

from __future__ import annotations

import pathlib
from typing import Callable

REPO = "FoundationVision/var"
VAE_FILE = "vae_ch160v4096z32.pth"
MODELS = ("d16", "d20", "d24", "d30", "d36")


class DownloadError(RuntimeError):
  """The checkpoints could not be fetched (network, hub, package)."""


def checkpoint_files(model: str) -> tuple[str, str]:
  """(VQVAE file, VAR file) in the hub repository for a released model."""
  if model not in MODELS:
    raise DownloadError(f"unknown model {model!r}; released: "
                        f"{', '.join(MODELS)}")
  return VAE_FILE, f"var_{model}.pth"


def fetch_files(model: str, cache_dir=None) -> tuple[pathlib.Path, ...]:
  """Downloads (or finds in the hub cache) the model's two .pth files."""
  try:
    import huggingface_hub
    from huggingface_hub import errors
  except ImportError:
    raise DownloadError("downloading needs huggingface_hub: pip install "
                        "huggingface_hub") from None
  paths = []
  for name in checkpoint_files(model):
    try:
      paths.append(pathlib.Path(huggingface_hub.hf_hub_download(
          REPO, name, cache_dir=cache_dir)))
    except errors.LocalEntryNotFoundError:
      raise DownloadError(
          f"cannot reach huggingface.co to fetch {REPO}/{name} and it is not "
          "in the local cache; check the network (or HF_HUB_OFFLINE)") from None
    except (errors.HfHubHTTPError, OSError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise DownloadError(f"fetching {REPO}/{name} failed: "
                          f"{type(e).__name__}: {first}") from None
  return tuple(paths)


def download(model: str, out, *, cache_dir=None, overwrite: bool = False,
             preset: str | None = None,
             fetch: Callable = fetch_files, log=print):
  """Fetches and converts one released model into the model directory `out`.

  Args:
    model: d16, d20, d24, d30 or d36.
    out: output model directory (refused if it exists, unless overwrite).
    cache_dir: huggingface_hub cache directory (default: its own).
    overwrite: replace an existing `out`.
    preset: the preset the files must match (default: `model`).
    fetch: `(model, cache_dir) -> (vae_path, var_path)`.
    log: progress lines.

  Returns:
    The written ModelConfig.
  """
  from var_jax import checkpoint
  from var_jax.convert.convert import convert_files
  checkpoint_files(model)  # Validates the name before any network access.
  if pathlib.Path(out).exists() and not overwrite:
    raise checkpoint.CheckpointError(
        f"{out} already exists; pass --overwrite to replace it")
  log(f"fetching {model} from huggingface.co/{REPO}")
  vae_path, var_path = fetch(model, cache_dir)
  return convert_files(vae_path, var_path, out, preset=preset or model,
                       overwrite=overwrite, log=log)
