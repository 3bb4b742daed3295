"""One rule decides which tokenizer, transformer and drafter work together.

`check_compatible` (on configs) names the first field two models must share
and do not, with both values, as one error type; loading a model directory,
starting a training run and downloading a drafter/refiner pair (see
test_download.py) all refuse through it.
"""

import dataclasses
import json
import shutil

import pytest

from var_jax import checkpoint
from var_jax.configs.models import DIGITS_VAE, DIGITS_VAR
from var_jax.errors import CheckpointError, IncompatibleModelsError
from var_jax.models.var.config import ModelConfig, check_compatible

_R = dataclasses.replace


def test_matching_models_pass():
  drafter = _R(DIGITS_VAR, depth=8, embed_dim=256, num_heads=8)
  check_compatible(DIGITS_VAE, DIGITS_VAR)
  check_compatible(DIGITS_VAE, DIGITS_VAR, drafter)
  check_compatible(None, DIGITS_VAR)  # A part left out is not compared.
  check_compatible(DIGITS_VAE, None)


# (which model changes, field, new value, (value named first, second)).
_MISMATCHES = [
    ("var", "vocab_size", 1024, ("VAR vocab_size 1024", "VQVAE 512")),
    ("var", "cvae", 8, ("VAR cvae 8", "VQVAE z_channels 16")),
    ("var", "patch_nums", (1, 2, 4), ("VAR patch_nums (1, 2, 4)",
                                      "VQVAE v_patch_nums (1, 2, 3, 4)")),
    ("vae", "vocab_size", 4096, ("VAR vocab_size 512", "VQVAE 4096")),
    ("vae", "v_patch_nums", (1, 2, 3, 5), ("VAR patch_nums (1, 2, 3, 4)",
                                           "v_patch_nums (1, 2, 3, 5)")),
    ("drafter", "num_classes", 1000, ("num_classes: 1000", "vs 10")),
    ("drafter", "patch_nums", (1, 2, 4), ("patch_nums: (1, 2, 4)",
                                          "vs (1, 2, 3, 4)")),
    ("drafter", "vocab_size", 4096, ("vocab_size: 4096", "vs 512")),
    ("drafter", "cvae", 32, ("cvae: 32", "vs 16")),
]


def test_every_shared_field_that_differs_is_named_with_both_values():
  for part, field, value, named in _MISMATCHES:
    cfgs = {"vae": DIGITS_VAE, "var": DIGITS_VAR,
            "drafter": DIGITS_VAR if part == "drafter" else None}
    cfgs[part] = _R(cfgs[part], **{field: value})
    with pytest.raises(IncompatibleModelsError) as e:
      check_compatible(cfgs["vae"], cfgs["var"], cfgs["drafter"],
                       where="here")
    msg = str(e.value)
    assert msg.startswith("here: "), msg
    if part == "drafter":
      assert f"drafter and refiner differ in {field}" in msg, msg
    first, second = named
    assert first in msg and second in msg, (field, msg)
    assert msg.index(first) < msg.index(second), msg
  # Callers that catch checkpoint or value errors catch this one too.
  assert issubclass(IncompatibleModelsError, CheckpointError)
  assert issubclass(IncompatibleModelsError, ValueError)


def test_loading_and_training_refuse_through_the_one_rule(
    random_digits_vae_dir, tmp_path):
  # A model directory whose config.json pairs a VAR with another tokenizer.
  d = tmp_path / "m"
  shutil.copytree(random_digits_vae_dir, d)
  cfg = json.loads((d / "config.json").read_text())
  cfg["var"] = dataclasses.asdict(_R(DIGITS_VAR, cvae=8))
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(IncompatibleModelsError, match="VAR cvae 8 vs VQVAE "
                     "z_channels 16"):
    checkpoint.load_config(d)

  # Training the tiny preset (vocab 256, 10 scales) on the digits tokenizer.
  from var_jax.training.config import TrainConfig
  from var_jax.training.trainer import resolve_sources
  with pytest.raises(IncompatibleModelsError, match=(
      f"tokenizer {random_digits_vae_dir} and model tiny: .*VAR vocab_size "
      "256 vs VQVAE 512")):
    resolve_sources(TrainConfig(model="tiny",
                                vae_ckpt=str(random_digits_vae_dir)))
  # Same vocabulary, code width and number of scales: the VAR's list rules.
  model = ModelConfig("d", _R(DIGITS_VAE, v_patch_nums=(1, 2, 3, 5)),
                      _R(DIGITS_VAR, patch_nums=(1, 2, 3, 5)))
  digits_run = TrainConfig(model=model, vae_ckpt=str(random_digits_vae_dir))
  assert resolve_sources(digits_run).cfg.vae.v_patch_nums == (1, 2, 3, 5)

