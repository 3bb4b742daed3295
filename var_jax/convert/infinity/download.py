"""`var-jax download --infinity 2b`: fetch the released Infinity files and
convert them into one model directory.

From huggingface.co/FoundationVision/Infinity the transformer and its
tokenizer, from huggingface.co/google/flan-t5-xl the text encoder's
config.json, tokenizer.json, safetensors index and the shards it names.
`download(..., fetch=...)` takes any function that returns those local
paths (the tests serve official-layout files without a network).
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable

from var_jax.convert.hub import hub_file, import_hub, run_fetch
from var_jax.convert.infinity import directory
from var_jax.convert.infinity.t5 import CONFIG, INDEX
from var_jax.data.text import TOKENIZER_FILE
from var_jax.errors import CheckpointError, DownloadError
from var_jax.io import as_path

REPO = "FoundationVision/Infinity"
T5_REPO = "google/flan-t5-xl"
# Released model -> (transformer file, tokenizer file).
MODELS = {"2b": ("infinity_2b_reg.pth", "infinity_vae_d32reg.pth")}


def fetch_files(model: str, cache_dir=None, pth_dir=None):
  """(transformer path, tokenizer path, T5 directory), downloaded or found
  in the huggingface_hub cache."""
  import_hub()
  inf_name, vae_name = MODELS[model]
  inf = hub_file(REPO, inf_name, cache_dir, pth_dir)
  vae = hub_file(REPO, vae_name, cache_dir, pth_dir)
  t5_pth = None if pth_dir is None else pathlib.Path(pth_dir) / "flan-t5-xl"
  index = hub_file(T5_REPO, INDEX, cache_dir, t5_pth)
  shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  for name in [CONFIG, TOKENIZER_FILE] + shards:
    hub_file(T5_REPO, name, cache_dir, t5_pth)
  return inf, vae, index.parent


def download(model: str, out, *, cache_dir=None, pth_dir=None,
             overwrite: bool = False, fetch: Callable | None = None,
             log=print):
  """Fetches a released Infinity model and converts it into `out`.

  Raises:
    DownloadError: an unknown model, or the fetch failed (one line).
    CheckpointError: `out` exists and `overwrite` is False (before any
      download).
  """
  if model not in MODELS:
    raise DownloadError(f"unknown Infinity model {model!r}; released and "
                        f"supported: {', '.join(MODELS)}")
  if as_path(out).exists() and not overwrite:
    raise CheckpointError(f"{out} already exists; pass --overwrite to "
                          "replace it")
  log(f"fetching Infinity {model} from huggingface.co/{REPO} and its text "
      f"encoder from huggingface.co/{T5_REPO}")
  inf, vae, t5_dir = run_fetch(fetch or fetch_files, f"{REPO} ({model})",
                               model, cache_dir, pth_dir)
  return directory.convert(inf, vae, t5_dir, out, overwrite=overwrite,
                           log=log)
