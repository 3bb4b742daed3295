"""The bundled default model's transformer: VAR on sklearn digits at 64px.

A 4-block, 128-wide VAR over the digits tokenizer's 4 scales (1, 2, 3, 4:
30 tokens per image), trained on the 1,617-image train split (every 10th
digit is held out). float32 because bfloat16 has no fast path on CPUs, where
`tools/train_default_model.py` runs it. The peak lr is set directly: the
ImageNet rule (1e-4 x batch / 256) is tuned for models 100x wider.
"""

from var_jax.training.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(
      model="digits", data="digits", global_batch=64, epochs=1, steps=3000,
      lr=1e-3, wd=0.05, wp=0.05, clip=2.0, cond_drop_rate=0.1,
      drop_path_rate=0.0, label_smooth=0.0, dtype="float32", ckpt_every=500,
      keep_ckpts=2, log_every=10, data_workers=0)
