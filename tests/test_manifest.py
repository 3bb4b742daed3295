"""Full-size models vs the manifest of the six released checkpoints.

No weights are needed: models are built with `nnx.eval_shape`, and the mapping
table is checked key by key and shape by shape against the official lists.
"""

import json

import numpy as np
import pytest
from flax import nnx

from var_jax.config import get_preset
from var_jax.convert import load
from var_jax.convert.mapping import var_rules, vqvae_rules
from var_jax.models.transformer import VAR
from var_jax.models.vqvae import VQVAE

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
  entries = manifest[name]
  by_name = {r.official: r for r in rules}
  assert set(by_name) == set(entries), (
      sorted(set(by_name) ^ set(entries))[:10])
  ours = {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model))}
  covered = set()
  for key, (shape, _dtype) in entries.items():
    r = by_name[key]
    assert tuple(r.official_shape) == tuple(shape), key
    if r.derived:
      continue
    # The transform must carry the official shape onto ours (a layer slice
    # for stacked block parameters).
    moved = r.transform(np.zeros(shape, np.float32)).shape
    want = ours[r.path][1:] if r.layer is not None else ours[r.path]
    assert moved == want, (key, moved, want)
    covered.add(r.path)
  assert covered == set(ours), sorted(set(ours) - covered)


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


@pytest.mark.parametrize("name", [n for n in MODELS if n.startswith("var")])
def test_config_inferred_from_shapes(manifest, name):
  cfg, _, _ = _build(name)
  fake = {k: np.zeros(s, np.float32) if k != "lvl_1L" else None
          for k, (s, _) in manifest[name].items()}
  fake["lvl_1L"] = np.concatenate(
      [np.full(pn * pn, i) for i, pn in enumerate(cfg.patch_nums)])[None]
  inferred = load.infer_var_config({k: v for k, v in fake.items()})
  load.check_preset(cfg, inferred, "VAR")


def test_vqvae_config_inferred(manifest):
  cfg, _, _ = _build("vae_ch160v4096z32")
  fake = {k: np.zeros(s, np.float32)
          for k, (s, _) in manifest["vae_ch160v4096z32"].items()}
  load.check_preset(cfg, load.infer_vqvae_config(fake), "VQVAE")
