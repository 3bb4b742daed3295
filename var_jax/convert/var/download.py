"""`var-jax download`: fetch the released checkpoints and convert them.

The fetch (huggingface_hub, repositories FoundationVision/var and, for
collaborative decoding's fine-tuned pairs, Zigeng/VAR_CoDe) is the only part
that needs the network; everything after it is conversion of local paths, so
`download(..., fetch=...)` and `download_pair(..., fetch=...)` take any
function that returns them.
"""

from __future__ import annotations

import contextlib
import pathlib
from typing import Callable

from var_jax.convert.hub import hub_file, import_hub, run_fetch
from var_jax.errors import DownloadError

REPO = "FoundationVision/var"
VAE_FILE = "vae_ch160v4096z32.pth"
MODELS = ("d16", "d20", "d24", "d30", "d36")
# CoDe (czg1225/CoDe README): a d30 drafter and a d16 refiner fine-tuned
# together for N draft steps, as drafter_{N}.pth / refiner_{N}.pth.
CODE_REPO = "Zigeng/VAR_CoDe"
CODE_STEPS = (6, 7, 8, 9)
CODE_MODELS = ("d30", "d16")


def checkpoint_files(model: str) -> tuple[str, str]:
  """(VQVAE file, VAR file) in the hub repository for a released model."""
  if model not in MODELS:
    raise DownloadError(f"unknown model {model!r}; released: "
                        f"{', '.join(MODELS)}")
  return VAE_FILE, f"var_{model}.pth"


def code_files(steps: int) -> tuple[str, str]:
  """(drafter file, refiner file) of CoDe's fine-tuned pair for `steps`.

  Raises:
    DownloadError: CoDe publishes no pair for that number of draft steps.
  """
  if steps not in CODE_STEPS:
    raise DownloadError(f"CoDe publishes pairs for --code "
                        f"{', '.join(map(str, CODE_STEPS))}, not {steps}")
  return f"drafter_{steps}.pth", f"refiner_{steps}.pth"


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
  import_hub()
  vae_name, var_name = checkpoint_files(model)
  return (hub_file(REPO, vae_name, cache_dir, pth_dir),
          hub_file(REPO, var_name, cache_dir, pth_dir))


def fetch_pair_files(drafter: str, refiner: str, steps: int | None,
                     cache_dir=None, pth_dir=None):
  """(VQVAE, drafter, refiner) paths of a pair, downloaded or cached.

  Args:
    drafter, refiner: released models (d16..d36) when `steps` is None.
    steps: CoDe's fine-tuned pair for this many draft steps (the drafter
      and refiner names are then not used).
    cache_dir, pth_dir: as `fetch_files`.
  """
  import_hub()
  vae = hub_file(REPO, VAE_FILE, cache_dir, pth_dir)
  if steps is not None:
    d_name, r_name = code_files(steps)
    return (vae, hub_file(CODE_REPO, d_name, cache_dir, pth_dir),
            hub_file(CODE_REPO, r_name, cache_dir, pth_dir))
  return (vae, hub_file(REPO, checkpoint_files(drafter)[1], cache_dir,
                         pth_dir),
          hub_file(REPO, checkpoint_files(refiner)[1], cache_dir, pth_dir))


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
  from var_jax.models.var.config import get_preset
  from var_jax.convert.var.convert import convert_files
  # Every check that needs no network comes before the (large) download.
  checkpoint_files(model)
  preset = preset or model
  try:
    get_preset(preset)
  except ValueError as e:
    raise DownloadError(str(e)) from None
  _check_outputs([out], out, pth_dir, overwrite)
  log(f"fetching {model} from huggingface.co/{REPO}")
  vae_path, var_path = run_fetch(fetch or fetch_files, f"{REPO} ({model})",
                                  model, cache_dir, pth_dir)
  return convert_files(vae_path, var_path, out, preset=preset,
                       overwrite=overwrite, log=log)


def _check_outputs(dirs, out, pth_dir, overwrite: bool) -> None:
  """Refuses existing model dirs and a --pth-dir that collides with --out."""
  from var_jax import checkpoint
  from var_jax.io import as_path, is_local
  for d in dirs:
    if as_path(d).exists() and not overwrite:
      raise checkpoint.CheckpointError(
          f"{d} already exists; pass --overwrite to replace it")
  if pth_dir is None:
    return
  if not is_local(pth_dir):
    raise DownloadError(f"--pth-dir must be a local directory (the hub "
                        f"writes it), got {pth_dir}")
  if is_local(out):
    pth = pathlib.Path(pth_dir).expanduser().resolve()
    top = pathlib.Path(out).expanduser().resolve()
    # Inside --out, the download would create the directory the conversion
    # then refuses (or, with --overwrite, replaces).
    if pth == top or top in pth.parents:
      raise DownloadError("--pth-dir must differ from --out and lie "
                          "outside it")


def download_pair(out, *, steps: int | None = None, drafter: str = "d30",
                  refiner: str = "d16", cache_dir=None, pth_dir=None,
                  overwrite: bool = False, presets=None,
                  fetch: Callable | None = None, log=print):
  """Fetches and converts a drafter/refiner pair into OUT/drafter, OUT/refiner.

  Each is an ordinary model directory (the VQVAE plus one VAR), written
  atomically; both are checked before either is written, and a failure
  while writing the refiner removes the new drafter, so a failed run never
  leaves half a pair.

  Args:
    out: directory to hold `drafter/` and `refiner/` (local or gs://).
    steps: CoDe's fine-tuned pair for this many draft steps (6..9, from
      Zigeng/VAR_CoDe: a d30 drafter and a d16 refiner); None: the
      training-free pair of released models `drafter` and `refiner`.
    drafter, refiner: released models (d16..d36), used when steps is None.
    cache_dir, pth_dir: as `download`.
    overwrite: replace existing OUT/drafter and OUT/refiner.
    presets: (drafter preset, refiner preset) the files must match, default
      the models'; None in either place means "as the tensors say" (tests
      pass small local files).
    fetch: `(drafter, refiner, steps, cache_dir, pth_dir) -> (vae,
      drafter, refiner paths)`; default `fetch_pair_files`.
    log: progress lines.

  Returns:
    (drafter ModelConfig, refiner ModelConfig) as written.

  Raises:
    DownloadError: an unknown model or step count, a bad --pth-dir, or a
      failed fetch.
    ConvertError, PthError: files that do not fit their preset.
    IncompatibleModelsError: a pair that cannot share one tokenizer
      (`check_compatible`), before anything is written.
    CheckpointError: OUT/drafter or OUT/refiner exists (before fetching).
    WriteError: writing failed; neither directory is left new.
  """
  from var_jax import checkpoint
  from var_jax.models.var.config import (ModelConfig, check_compatible,
                                         get_preset)
  from var_jax.convert.var import convert
  from var_jax.io import _rmtree, as_path
  # Every check that needs no network comes before the (large) download.
  if steps is not None:
    code_files(steps)
    drafter, refiner = CODE_MODELS
  else:
    checkpoint_files(drafter), checkpoint_files(refiner)
  presets = (drafter, refiner) if presets is None else tuple(presets)
  for name in presets:
    if name is not None:
      try:
        get_preset(name)
      except ValueError as e:
        raise DownloadError(str(e)) from None
  out = as_path(out)
  dirs = (out / "drafter", out / "refiner")
  _check_outputs(dirs, out, pth_dir, overwrite)
  what = (f"{CODE_REPO} (N={steps})" if steps is not None
          else f"{REPO} ({drafter} + {refiner})")
  log(f"fetching {what} from huggingface.co")
  paths = run_fetch(fetch or fetch_pair_files, what, drafter, refiner,
                     steps, cache_dir, pth_dir)
  log(f"reading {paths[0]}")
  vae_sd = convert.read_official(paths[0], "vae")
  sds, cfgs = [], []
  for path, preset in zip(paths[1:], presets):
    log(f"reading {path}")
    sds.append(convert.read_official(path, "var"))
    vae_cfg, var_cfg = convert.infer_configs(vae_sd, sds[-1], preset)
    cfgs.append(ModelConfig(name=preset or "converted", vae=vae_cfg,
                            var=var_cfg))
  check_compatible(cfgs[1].vae, cfgs[1].var, cfgs[0].var)
  # Both mapped (every key and shape checked) before anything is written;
  # the state dicts go as soon as they are mapped (d30 alone is 8 GB).
  states = []
  for i, cfg in enumerate(cfgs):
    states.append(convert.official_states(vae_sd, sds[i], cfg.vae, cfg.var))
    sds[i] = None
  created = not out.exists()
  for i, (d, cfg) in enumerate(zip(dirs, cfgs)):
    log(f"writing {d}")
    try:
      checkpoint.save_model(d, cfg, *states[i], overwrite=overwrite)
    except BaseException:
      if i:
        _rmtree(dirs[0], settle=0)  # Never half a pair.
      if created:
        with contextlib.suppress(OSError):
          out.rmdir()  # Only when empty: ours, made by this run.
      raise
    states[i] = None
  return cfgs[0], cfgs[1]
