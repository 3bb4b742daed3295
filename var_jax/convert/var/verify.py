"""Side-by-side check of our models against the official PyTorch code.

Needs torch and a checkout of FoundationVision/VAR; neither is a dependency of
var-jax, so everything here is imported only when `var-jax verify` runs.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import pathlib
import sys
import types
import warnings

import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.convert.var import convert
from var_jax.models.var import quantizer
from var_jax.models.var.transformer import VAR
from var_jax.models.var.vqvae import VQVAE
from var_jax.errors import VerifyError

# Golden tolerances (../shared/golden/README.md): relative to max magnitude.
REL_TOL = 1e-4


# The one line `var-jax verify` prints without torch: a command that works
# as it stands (torch is the whole `verify` extra).
TORCH_HINT = ("torch is not installed, and verify runs the official PyTorch "
              "code: pip install torch (a CPU wheel is enough: pip install "
              "torch --index-url https://download.pytorch.org/whl/cpu)")


def import_torch():
  """torch, or a VerifyError that says how to install it.

  Raises:
    VerifyError: torch cannot be imported.
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise VerifyError(TORCH_HINT) from None
  return torch


def _import_official(repo: pathlib.Path):
  import_torch()
  if not (repo / "models" / "var.py").is_file():
    raise VerifyError(f"{repo} is not a checkout of FoundationVision/VAR "
                      "(no models/var.py)")
  if "huggingface_hub" not in sys.modules:
    try:
      # Importable: the official code gets the real one.
      importlib.import_module("huggingface_hub")
    except ImportError:  # Only the hub mixin is imported by the official code.
      stub = types.ModuleType("huggingface_hub")
      stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
      sys.modules["huggingface_hub"] = stub
  sys.path.insert(0, str(repo))
  try:
    import models  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    # Not one of ours to name an install command for: the official code's
    # own requirements (its requirements.txt pins an old torch).
    raise VerifyError(f"importing the official code in {repo} failed ("
                      f"{' '.join(str(e).split())}); it needs what its "
                      "requirements.txt lists") from None
  return models


def _ours(vae_cfg, var_cfg, vae_state, var_state):
  vae = VQVAE(vae_cfg, rngs=nnx.Rngs(0))
  nnx.update(vae, _as_state(vae, vae_state))
  var = None
  if var_state is not None:
    var = VAR(var_cfg, rngs=nnx.Rngs(0))
    nnx.update(var, _as_state(var, var_state))
  return vae, var


def _as_state(model, pure):
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, jnp_tree(pure))
  return state


def jnp_tree(tree):
  return {k: jnp_tree(v) if isinstance(v, dict) else jnp.asarray(v)
          for k, v in tree.items()}


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _torch_sd(torch, sd: dict) -> dict:
  # Writable copies: the state dicts we read may be read-only views (of a
  # memory map or a bytes buffer), which torch.from_numpy warns about.
  return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}


@contextlib.contextmanager
def _official_quiet():
  """Around the official code: its progress prints go to stderr (stdout is
  the report's JSON line alone), and its FutureWarnings (deprecated torch
  calls in code we do not own) are not shown."""
  with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    yield


def run_verify(torch_repo, vae_path, var_path=None, batch=2, seed=0) -> dict:
  """Runs both implementations on random inputs; returns the differences.

  Raises:
    VerifyError: torch is not installed (the message says how to install
      it), or `torch_repo` is not a checkout of FoundationVision/VAR.
  """
  torch = import_torch()
  models = _import_official(pathlib.Path(torch_repo))
  vae_sd = convert.read_official(vae_path, "vae")
  var_sd = convert.read_official(var_path, "var") if var_path else None
  vae_cfg, var_cfg = convert.infer_configs(vae_sd, var_sd, None)
  vae_state, var_state = convert.official_states(vae_sd, var_sd, vae_cfg,
                                                 var_cfg)
  vae, var = _ours(vae_cfg, var_cfg, vae_state, var_state)

  with _official_quiet():
    t_vae = models.VQVAE(vocab_size=vae_cfg.vocab_size,
                         z_channels=vae_cfg.z_channels, ch=vae_cfg.ch,
                         test_mode=True,
                         share_quant_resi=vae_cfg.share_quant_resi,
                         v_patch_nums=vae_cfg.v_patch_nums)
  t_vae.load_state_dict(_torch_sd(torch, vae_sd), strict=True)
  rng = np.random.default_rng(seed)
  res = vae_cfg.resolution
  img = rng.integers(0, 256, (batch, res, res, 3), dtype=np.uint8)
  x = img.astype(np.float32) / 127.5 - 1
  x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  report = {"batch": batch, "seed": seed}
  with torch.no_grad(), _official_quiet():
    f_t = t_vae.quant_conv(t_vae.encoder(x_t)).numpy().transpose(0, 2, 3, 1)
    # The official tokens stay torch tensors for the official VAR input
    # below; `idx_t` is their NumPy copy for the comparisons and our side.
    idx_torch = t_vae.img_to_idxBl(x_t)
    idx_t = [i.numpy() for i in idx_torch]
  f = vae.encode(jnp.asarray(x))
  report["features_rel_err"] = _rel(f, f_t)
  idx = quantizer.f_to_idx(vae.quantize, f, vae_cfg.v_patch_nums)
  report["token_mismatches"] = int(sum(
      int(np.sum(np.asarray(a) != b)) for a, b in zip(idx, idx_t)))
  report["tokens_total"] = int(sum(b.size for b in idx_t))
  ok = report["features_rel_err"] <= REL_TOL and report["token_mismatches"] == 0

  if var is not None:
    with _official_quiet():
      t_var = _official_var(models, t_vae, var_cfg)
    t_var.load_state_dict(_torch_sd(torch, var_sd), strict=False)
    t_var.eval()
    labels = rng.integers(0, var_cfg.num_classes, (batch,))
    with torch.no_grad(), _official_quiet():
      x_in = t_vae.quantize.idxBl_to_var_input(idx_torch)
      logits_t = t_var(torch.from_numpy(labels), x_in).numpy()
    x_in_ours = quantizer.idx_to_var_input(
        vae.quantize, [jnp.asarray(i) for i in idx_t], var_cfg.patch_nums)
    logits = var(jnp.asarray(labels), x_in_ours)
    report["var_input_rel_err"] = _rel(x_in_ours, x_in.numpy())
    report["logits_rel_err"] = _rel(logits, logits_t)
    ok = ok and report["logits_rel_err"] <= REL_TOL
  report["tolerance"] = REL_TOL
  report["ok"] = bool(ok)
  return report


def _official_var(models, t_vae, var_cfg):
  return models.VAR(
      vae_local=t_vae, num_classes=var_cfg.num_classes, depth=var_cfg.depth,
      embed_dim=var_cfg.embed_dim, num_heads=var_cfg.num_heads,
      mlp_ratio=var_cfg.mlp_ratio, norm_eps=var_cfg.norm_eps,
      shared_aln=var_cfg.shared_aln, cond_drop_rate=0.0,
      attn_l2_norm=var_cfg.attn_l2_norm, patch_nums=var_cfg.patch_nums,
      flash_if_available=False, fused_if_available=False)


def print_report(report: dict) -> int:
  print(json.dumps(report))
  return 0 if report["ok"] else 1


__all__ = ["run_verify", "print_report", "import_torch", "VerifyError"]
