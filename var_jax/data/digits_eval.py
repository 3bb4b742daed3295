"""Independent checks of the bundled digits model.

A scikit-learn classifier, trained on the real 8x8 digits and knowing nothing
of our models, labels generated samples; the tokenizer's reconstruction PSNR
is measured on the held-out split. Both go through the same 64px rendering
the training data uses (`augment.digits_to_image`), brought back to 8x8 by
area averaging, so the classifier sees real and generated digits alike. The
PSNR is the one training logs (`models.vqvae.psnr`).
"""

from __future__ import annotations

import numpy as np
from var_jax.errors import UserError


def to_features(images_BHWC) -> np.ndarray:
  """Images in [0, 1] (any square size divisible by 8) -> (B, 64) in 0..16."""
  x = np.asarray(images_BHWC, np.float64).mean(-1)  # Gray: channels agree.
  b, h, w = x.shape
  if h != w or h % 8:
    raise UserError(f"expected square images with side divisible by 8, got "
                     f"{h}x{w}")
  k = h // 8
  return x.reshape(b, 8, k, 8, k).mean((2, 4)).reshape(b, 64) * 16


def rendered_digits(split: str, resolution: int):
  """(images in [0, 1] (N, res, res, 3), labels) of a digits split."""
  from var_jax.data.sources import AugConfig, DigitsSource
  src = DigitsSource(split, AugConfig(resolution=resolution, train=False))
  imgs, labels = [], []
  rng = np.random.default_rng(0)
  for i in range(len(src)):
    img, label = src.example(i, rng)
    imgs.append((img + 1) / 2)
    labels.append(label)
  return np.stack(imgs).astype(np.float32), np.asarray(labels, np.int32)


def train_classifier(resolution: int = 64):
  """An RBF SVM on the rendered train split; returns (clf, val accuracy).

  Raises:
    DataError: scikit-learn is not installed.
  """
  from var_jax.data.sources import import_sklearn
  svm = import_sklearn("svm", "the digits classifier check")
  x, y = rendered_digits("train", resolution)
  clf = svm.SVC(gamma="scale", C=10.0).fit(to_features(x), y)
  xv, yv = rendered_digits("val", resolution)
  return clf, float((clf.predict(to_features(xv)) == yv).mean())


def agreement(clf, images_BHWC, labels_B) -> float:
  """Fraction of images the classifier assigns to the requested class."""
  pred = clf.predict(to_features(images_BHWC))
  return float((pred == np.asarray(labels_B)).mean())


def tokenizer_psnr(vae, resolution: int, batch: int = 64) -> float:
  """Reconstruction PSNR (dB) of the tokenizer on the held-out digits.

  The training metric's definition, `models.vqvae.psnr` (images in
  [-1, 1]; reconstructions clipped to it; peak 1 on the [0, 1] scale; one
  value per image), averaged over the images.
  """
  import jax
  from flax import nnx

  from var_jax.models.var.vqvae import psnr
  x, _ = rendered_digits("val", resolution)
  x = x * 2 - 1  # [0, 1] -> the models' [-1, 1].
  graph, state = nnx.split(vae)

  @jax.jit
  def psnr_B(state, x_BHWC):
    m = nnx.merge(graph, state)
    return psnr(m.decode(m.img_to_fhats(x_BHWC)[-1]), x_BHWC)

  return float(np.mean(np.concatenate([
      np.asarray(psnr_B(state, x[i:i + batch]))
      for i in range(0, len(x), batch)])))
