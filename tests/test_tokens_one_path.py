"""`var-jax encode`, `var-jax tokenize` and edits tokenize images one way.

All three call `vqvae.jit_tokenizer`; uint8 images (what `encode` reads) are
scaled inside it exactly as the data pipeline scales the images `tokenize`
reads (`augment.to_pm1`), so the same picture gives the same tokens through
either command.
"""

import numpy as np

from var_jax import checkpoint, cli
from var_jax.data import augment
from var_jax.models.var.vqvae import jit_tokenizer


def test_encode_gives_the_tokens_of_the_data_pipelines_images(
    random_digits_vae_dir, tmp_path, capsys):
  cfg, vae, _ = checkpoint.load_model(random_digits_vae_dir, need_var=False)
  side = cfg.vae.resolution
  imgs_BHWC = np.random.default_rng(0).integers(0, 256, (3, side, side, 3),
                                                np.uint8)
  assert len(np.unique(imgs_BHWC)) == 256  # Every uint8 value is scaled.
  np.save(tmp_path / "x.npy", imgs_BHWC)
  rc = cli.main(["--no-compile-cache", "encode", "--ckpt",
                 str(random_digits_vae_dir), "--images",
                 str(tmp_path / "x.npy"), "--out", str(tmp_path / "t.npz"),
                 "--batch", "2"])
  assert rc == 0, capsys.readouterr().err
  got = np.load(tmp_path / "t.npz")
  want = jit_tokenizer(vae)(np.stack([augment.to_pm1(x) for x in imgs_BHWC]))
  assert len(got.files) == len(want) == len(cfg.vae.v_patch_nums)
  for k, idx_BL in enumerate(want):
    np.testing.assert_array_equal(got[f"idx_{k}"], np.asarray(idx_BL))
