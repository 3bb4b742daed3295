"""The golden tiny models (loaded through the real converter path), and
small random models for tests that need no reference numbers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax.models.var.config import VARConfig, get_preset
from var_jax.configs.models import DIGITS_VAE
from var_jax.convert.var.convert import official_states, read_official
from var_jax.models.abstract import abstract_split
from var_jax.models.var.transformer import VAR
from var_jax.models.var.vqvae import VQVAE


def official_model(ctor, cfg, vae_sd=None, var_sd=None):
  """`ctor(cfg)` holding an official state dict, through the converter's own
  mapping (`official_states`, what `var-jax convert` writes).

  Built from abstract shapes, as `checkpoint.load_model` builds a model:
  constructing eagerly would compile one XLA program per parameter shape
  for initial values that are overwritten anyway (seconds per model).
  """
  graph, state = abstract_split(ctor, cfg)
  vae_state, var_state = official_states(
      vae_sd, var_sd, cfg if vae_sd is not None else None,
      cfg if var_sd is not None else None)
  pure = vae_state if vae_sd is not None else var_state
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  return nnx.merge(graph, state)


@functools.lru_cache(maxsize=None)
def golden_vae(golden_dir, preset="tiny"):
  cfg = get_preset(preset).vae
  sd = read_official(golden_dir / "vae_tiny.pth", "vae")
  return official_model(VQVAE, cfg, vae_sd=sd)


@functools.lru_cache(maxsize=None)
def golden_var(golden_dir, preset="tiny"):
  cfg = get_preset(preset).var
  pth = "var_tiny.pth" if preset == "tiny" else "var_tiny_saln512.pth"
  sd = read_official(golden_dir / pth, "var")
  return official_model(VAR, cfg, var_sd=sd)


# Small random models for equivalence tests that need no reference numbers
# (two sampler forms agree, a split batch equals the whole, one device equals
# four): 64px, 4 scales (30 tokens), 2 blocks of width 64, so they compile and
# run in a fraction of the golden 256px models' time.
SMALL_VAE = DIGITS_VAE


def small_var_config(shared_aln: bool = False) -> VARConfig:
  return VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10,
                   vocab_size=SMALL_VAE.vocab_size, cvae=SMALL_VAE.z_channels,
                   patch_nums=SMALL_VAE.v_patch_nums, shared_aln=shared_aln,
                   attn_l2_norm=True, cond_drop_rate=0.0, drop_path_rate=0.0)


def random_model(ctor, cfg, seed: int):
  """`ctor(cfg)`'s module with every parameter random and non-trivial (as the
  golden models have: the constructors' zeros, ones and 1e-5 gains would
  make many logits tie and an equivalence test prove little).

  Built from abstract shapes and filled with numpy: constructing eagerly
  compiles one XLA program per parameter shape (about a minute on a busy
  2-core machine). Weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2),
  biases and the rest ~ N(0, 0.1^2); buffers (codebook usage) start at 0.
  """
  graph, state = abstract_split(ctor, cfg)
  rng = np.random.default_rng(seed)

  def fill(path, v):
    name = str(path[-1])
    shape, dtype = v.shape, v.dtype
    if not isinstance(v, nnx.Param):
      return v.replace(jnp.zeros(shape, dtype))
    x = rng.standard_normal(shape)
    if name == "scale":
      x = 1 + 0.1 * x
    elif len(shape) >= 2 and name not in ("pos_1LC", "pos_start"):
      x = x / np.sqrt(np.prod(shape[:-1]) / (shape[0] if name.startswith(
          ("mat_", "fc", "proj_", "ada_")) else 1))
    else:
      x = 0.1 * x
    return v.replace(jnp.asarray(x, dtype))

  flat = [(p, fill(p, v)) for p, v in nnx.to_flat_state(state)]
  return nnx.merge(graph, nnx.from_flat_state(flat))


@functools.lru_cache(maxsize=None)
def small_vae(seed: int = 0) -> VQVAE:
  """A random 64px tokenizer (DIGITS_VAE layout: 4 scales, 512 codes)."""
  return random_model(VQVAE, SMALL_VAE, seed)


@functools.lru_cache(maxsize=None)
def small_var(seed: int = 0, shared_aln: bool = False) -> VAR:
  """A random 2-block VAR over `small_vae`'s tokens (10 classes)."""
  cfg = small_var_config(shared_aln)
  return random_model(VAR, cfg, seed + 1)
