"""`var-jax download --infinity 2b|8b`: fetch the released Infinity files
and convert them into one model directory.

From huggingface.co/FoundationVision/Infinity the transformer (2B: one
`.pth`; 8B: the `infinity_8b_weights/` folder, its index and the shards it
names) and its tokenizer, from huggingface.co/google/flan-t5-xl the text encoder's
config.json, tokenizer.json, safetensors index and the shards it names.
`download(..., fetch=...)` takes any function that returns those local
paths (the tests serve official-layout files without a network).
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable

from var_jax.convert.hub import first_hub_file, hub_file, import_hub, run_fetch
from var_jax.convert.infinity import directory
from var_jax.convert.infinity.t5 import CONFIG, UNUSED_PREFIXES
from var_jax.convert.weights import INDEX_FILES
from var_jax.data.text import TOKENIZER_FILE
from var_jax.errors import CheckpointError, DownloadError
from var_jax.io import as_path

REPO = "FoundationVision/Infinity"
T5_REPO = "google/flan-t5-xl"
# Released model -> (transformer file or folder, tokenizer file).
MODELS = {"2b": ("infinity_2b_reg.pth", "infinity_vae_d32reg.pth"),
          "8b": ("infinity_8b_weights/",
                 "infinity_vae_d56_f8_14_patchify.pth")}


def _fetch_sharded(repo: str, folder: str, cache_dir, pth_dir,
                   skip_prefixes: tuple[str, ...] = ()) -> pathlib.Path:
  """A checkpoint folder of a repository: its index (safetensors or
  PyTorch) and every shard that the index names; the local folder."""
  index = first_hub_file(repo, [folder + n for n in INDEX_FILES], cache_dir,
                         pth_dir)
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
    shards = sorted({str(f) for k, f in weight_map.items()
                     if not k.startswith(skip_prefixes)})
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
    raise DownloadError(f"{repo}/{folder}{index.name} is not a checkpoint "
                        "index (no weight_map)") from None
  for name in shards:
    hub_file(repo, folder + name, cache_dir, pth_dir)
  return index.parent


def fetch_files(model: str, cache_dir=None, pth_dir=None):
  """(transformer path, tokenizer path, T5 directory), downloaded or found
  in the huggingface_hub cache."""
  import_hub()
  inf_name, vae_name = MODELS[model]
  if inf_name.endswith("/"):
    inf = _fetch_sharded(REPO, inf_name, cache_dir, pth_dir)
  else:
    inf = hub_file(REPO, inf_name, cache_dir, pth_dir)
  vae = hub_file(REPO, vae_name, cache_dir, pth_dir)
  t5_pth = None if pth_dir is None else pathlib.Path(pth_dir) / "flan-t5-xl"
  t5_dir = _fetch_sharded(T5_REPO, "", cache_dir, t5_pth, UNUSED_PREFIXES)
  for name in (CONFIG, TOKENIZER_FILE):
    hub_file(T5_REPO, name, cache_dir, t5_pth)
  return inf, vae, t5_dir


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
