"""Analytic FLOPs of sampling (transformer with CFG + decoder), tokenizing.

Pure Python over the config dataclasses (no JAX), so the official-PyTorch
benchmark tool counts exactly the same work. Every matmul or convolution is
2 * m * n * k; elementwise work (norms, activations, softmax) and the tiny
Phi convolutions / interpolations of the scale loop (~0.05 GFLOP per d16
image) are left out.
"""

from __future__ import annotations

from var_jax.config import VARConfig, VQVAEConfig


def var_sample_flops(cfg: VARConfig) -> float:
  """Transformer FLOPs of one sample with classifier-free guidance.

  Each sample runs two rows (conditional and null class). Scale `si` feeds
  its `l = pn * pn` new tokens through every block; with the KV cache their
  queries attend to the `end = start + l` keys seen so far. The AdaLN and
  head-norm linears run once per row and scale; `word_embed` builds the next
  scale's input once per sample (it is repeated for the two rows after).
  """
  c, f, v, d = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size, cfg.depth
  ada = 2 * c * 6 * c * (1 if cfg.shared_aln else d)
  total, end = 0, 0
  for si, pn in enumerate(cfg.patch_nums):
    l = pn * pn
    end += l
    per_token = d * (2 * (4 * c * c + 2 * c * f) + 4 * end * c) + 2 * c * v
    total += 2 * (l * per_token + ada + 2 * c * 2 * c)
    if si > 0:
      total += l * 2 * cfg.cvae * c
  return float(total)


def _conv(hw, cin, cout, k=3):
  return 2 * hw * cin * cout * k * k


def _resnet(hw, cin, cout):
  skip = _conv(hw, cin, cout, 1) if cin != cout else 0
  return _conv(hw, cin, cout) + _conv(hw, cout, cout) + skip


def _attn(hw, c):
  return _conv(hw, c, 3 * c, 1) + 4 * hw * hw * c + _conv(hw, c, c, 1)


def decoder_flops(cfg: VQVAEConfig) -> float:
  """FLOPs of `post_quant_conv` + the decoder for one image (f_hat -> RGB)."""
  n = len(cfg.ch_mult)
  side = cfg.v_patch_nums[-1]
  hw = side * side
  c = cfg.ch * cfg.ch_mult[-1]
  total = _conv(hw, cfg.z_channels, cfg.z_channels, cfg.quant_conv_ks)
  total += _conv(hw, cfg.z_channels, c)
  total += 2 * _resnet(hw, c, c) + _attn(hw, c)  # mid
  for i in reversed(range(n)):
    out = cfg.ch * cfg.ch_mult[i]
    for _ in range(cfg.num_res_blocks + 1):
      total += _resnet(hw, c, out)
      c = out
      if i == n - 1:
        total += _attn(hw, c)
    if i != 0:
      hw *= 4  # Nearest 2x upsampling, then a 3x3 conv at the new size.
      total += _conv(hw, c, c)
  total += _conv(hw, c, cfg.in_channels)
  return float(total)


def tokenizer_flops(cfg: VQVAEConfig) -> float:
  """FLOPs of tokenizing one image: encoder, quant_conv, multi-scale VQ.

  Per scale: the codebook distances (a (pn^2, C) x (C, V) matmul) and the Phi
  convolution at the full latent size.
  """
  n, z = len(cfg.ch_mult), cfg.z_channels
  side = cfg.resolution
  hw = side * side
  c = cfg.ch
  total = _conv(hw, cfg.in_channels, c)
  for i in range(n):
    out = cfg.ch * cfg.ch_mult[i]
    for _ in range(cfg.num_res_blocks):
      total += _resnet(hw, c, out)
      c = out
      if i == n - 1:
        total += _attn(hw, c)
    if i != n - 1:
      hw //= 4  # Stride-2 3x3 conv.
      total += _conv(hw, c, c)
  total += 2 * _resnet(hw, c, c) + _attn(hw, c)  # mid
  total += _conv(hw, c, z) + _conv(hw, z, z, cfg.quant_conv_ks)
  for pn in cfg.v_patch_nums:
    total += 2 * pn * pn * cfg.vocab_size * z + _conv(hw, z, z)
  return float(total)


def sample_flops(var_cfg: VARConfig, vae_cfg: VQVAEConfig) -> dict:
  """{'transformer', 'decoder', 'total'} FLOPs per sampled image."""
  t, dec = var_sample_flops(var_cfg), decoder_flops(vae_cfg)
  return {"transformer": t, "decoder": dec, "total": t + dec}
