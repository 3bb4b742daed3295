"""Full-size models vs the manifest of the six released checkpoints.

No weights are needed: models are built with `nnx.eval_shape`, and the mapping
table is checked key by key and shape by shape against the official lists.
"""

import functools
import json

import numpy as np
import pytest
from flax import nnx

from mapping_check import check_mapping

from var_jax.models.var.config import get_preset
from var_jax.convert.var import load
from var_jax.convert.var.official_names import var_rules, vqvae_rules
from var_jax.models.var.transformer import VAR
from var_jax.models.var.vqvae import VQVAE

MODELS = {
    "vae_ch160v4096z32": ("vqvae", 109.0),
    "var_d16": ("d16", 310.8),
    "var_d20": ("d20", 601.4),
    "var_d24": ("d24", 1033.9),
    "var_d30": ("d30", 2010.5),
    "var_d36": ("d36", 2359.0),
}


@pytest.fixture(scope="module")
def manifest(golden_dir):
  return json.loads((golden_dir / "manifest_official.json").read_text())


@functools.lru_cache(maxsize=None)  # Abstract models: nothing changes them.
def _build(name):
  preset, _ = MODELS[name]
  cfg = get_preset(preset)
  if name.startswith("vae"):
    return cfg.vae, vqvae_rules(cfg.vae), nnx.eval_shape(
        lambda: VQVAE(cfg.vae, rngs=nnx.Rngs(0)))
  return cfg.var, var_rules(cfg.var), nnx.eval_shape(
      lambda: VAR(cfg.var, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name", list(MODELS))
def test_mapping_covers_manifest(manifest, name):
  _, rules, model = _build(name)
  check_mapping(rules, {k: shape for k, (shape, _) in manifest[name].items()},
                nnx.state(model))


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_counts(manifest, name):
  _, rules, model = _build(name)
  _, millions = MODELS[name]
  total = sum(int(np.prod(s)) for s, _ in manifest[name].values())
  assert round(total / 1e6, 1) == millions
  ours = sum(int(np.prod(v.shape))
             for _, v in nnx.to_flat_state(nnx.state(model)))
  derived = sum(int(np.prod(r.official_shape)) for r in rules if r.derived)
  assert ours + derived == total


# The scale lists of the official code (FoundationVision/VAR: `patch_nums`
# of the 256px models, and of the 512px d36 in its demo), written out here so
# that inference is checked against the source, not against our own presets.
OFFICIAL_SCALES_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
OFFICIAL_SCALES_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def _official_scales(name):
  return OFFICIAL_SCALES_512 if name == "var_d36" else OFFICIAL_SCALES_256


def _fake_state_dict(manifest, name, scales):
  """Zeros of the manifest's shapes; `lvl_1L` as the official buffer of
  `scales` (scale index of every token), or left out when `scales` is None."""
  fake = {k: np.zeros(s, np.float32) for k, (s, _) in manifest[name].items()
          if k != "lvl_1L"}
  if scales is not None:
    fake["lvl_1L"] = np.concatenate(
        [np.full(pn * pn, i) for i, pn in enumerate(scales)])[None]
  return fake


@pytest.mark.parametrize("with_buffer", [True, False])
@pytest.mark.parametrize("name", [n for n in MODELS if n.startswith("var")])
def test_config_inferred_from_shapes(manifest, name, with_buffer):
  scales = _official_scales(name)
  # The written-out list agrees with the manifest's shapes.
  (_, seq, _), _ = manifest[name]["pos_1LC"]
  assert sum(p * p for p in scales) == seq
  assert manifest[name]["lvl_embed.weight"][0][0] == len(scales)
  inferred = load.infer_var_config(
      _fake_state_dict(manifest, name, scales if with_buffer else None))
  assert inferred.patch_nums == scales
  cfg, _, _ = _build(name)
  load.check_preset(cfg, inferred, "VAR")


def test_scale_list_is_read_from_the_level_buffer(manifest):
  # A d16 file whose level buffer describes the 512px list is not a d16.
  inferred = load.infer_var_config(
      _fake_state_dict(manifest, "var_d16", OFFICIAL_SCALES_512))
  assert inferred.patch_nums == OFFICIAL_SCALES_512
  cfg, _, _ = _build("var_d16")
  with pytest.raises(load.ConvertError, match="patch_nums"):
    load.check_preset(cfg, inferred, "VAR")


def test_vqvae_config_inferred(manifest):
  cfg, _, _ = _build("vae_ch160v4096z32")
  fake = {k: np.zeros(s, np.float32)
          for k, (s, _) in manifest["vae_ch160v4096z32"].items()}
  load.check_preset(cfg, load.infer_vqvae_config(fake), "VQVAE")
