"""Loading the golden tiny models through the real converter path."""

import functools

from flax import nnx

from var_jax.config import get_preset
from var_jax.convert import load
from var_jax.convert.convert import read_official
from var_jax.convert.mapping import var_rules, vqvae_rules
from var_jax.models.transformer import VAR
from var_jax.models.vqvae import VQVAE


@functools.lru_cache(maxsize=None)
def golden_vae(golden_dir, preset="tiny"):
  cfg = get_preset(preset).vae
  vae = VQVAE(cfg, rngs=nnx.Rngs(0))
  sd = read_official(golden_dir / "vae_tiny.pth", "vae")
  load.load_official(vae, vqvae_rules(cfg), sd, "VQVAE")
  return vae


@functools.lru_cache(maxsize=None)
def golden_var(golden_dir, preset="tiny"):
  cfg = get_preset(preset).var
  pth = "var_tiny.pth" if preset == "tiny" else "var_tiny_saln512.pth"
  sd = read_official(golden_dir / pth, "var")
  var = VAR(cfg, rngs=nnx.Rngs(0))
  load.load_official(var, var_rules(cfg), sd, "VAR", cfg.patch_nums)
  return var
