"""The bundled digits model: it loads offline and draws the asked digits."""

import json

import numpy as np
from PIL import Image

from var_jax import checkpoint, cli
from var_jax.data import digits_eval
from var_jax.sampling.sampler import SampleOptions, Sampler

PER_CLASS = 4


def test_bundled_model_is_complete():
  d = checkpoint.DEFAULT_MODEL
  for name in ("config.json", "vae", "var", "report.json"):
    assert (d / name).exists(), name
  size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
  assert size < 12e6, size  # Package data must stay small (float16).
  report = json.loads((d / "report.json").read_text())
  assert report["sample_class_agreement"] >= 0.9, report


def test_samples_are_digits_of_the_requested_class():
  _, vae, var = checkpoint.load_model(None)
  labels = np.repeat(np.arange(10), PER_CLASS)
  out = Sampler(vae, var, SampleOptions())(labels, seed=123)
  clf, real_acc = digits_eval.train_classifier(vae.cfg.resolution)
  assert real_acc > 0.97  # The judge itself is reliable.
  agree = digits_eval.agreement(clf, np.asarray(out.images_BHWC), labels)
  # 90% is the figure over 1,000 samples (report.json); a 40-sample batch
  # gets a floor with room for sampling noise.
  assert agree >= 0.8, agree


def test_tokenizer_reconstructs_held_out_digits():
  _, vae, _ = checkpoint.load_model(None, need_var=False)
  assert digits_eval.tokenizer_psnr(vae, vae.cfg.resolution) > 20


def test_sample_without_ckpt_writes_one_row_per_class(tmp_path):
  out = tmp_path / "digits.png"
  assert cli.main(["sample", "--per-class", "3", "--out", str(out)]) == 0
  w, h = Image.open(out).size
  side = checkpoint.load_config(checkpoint.DEFAULT_MODEL).vae.resolution
  assert (w, h) == (3 * (side + 2) + 2, 10 * (side + 2) + 2)
