"""Analytic FLOPs of sampling (transformer with CFG + decoder), tokenizing.

Pure Python over the config dataclasses (no JAX), so the official-PyTorch
benchmark tool counts exactly the same work. Every matmul or convolution is
2 * m * n * k; elementwise work (norms, activations, softmax) and the tiny
Phi convolutions / interpolations of the scale loop (~0.05 GFLOP per d16
image) are left out.
"""

from __future__ import annotations

from var_jax.models.var.config import VARConfig, VQVAEConfig
from var_jax.models.scales import layout


def var_sample_flops(cfg: VARConfig, scales=None, cfg_until=None,
                     prefill: bool = False) -> float:
  """Transformer FLOPs of one sample with classifier-free guidance.

  Each guided scale runs two rows per sample (conditional and null class),
  a scale at or after `cfg_until` one row. Scale `si` feeds its
  `l = pn * pn` new tokens through every block; with the KV cache their
  queries attend to the `end = start + l` keys seen so far. The AdaLN and
  head-norm linears run once per row and scale; `word_embed` builds the next
  scale's input once per sample (it is repeated for the two rows after).

  Args:
    cfg: the transformer.
    scales: the scales this model draws (default: all).
    cfg_until: first scale without guidance (default: none).
    prefill: the first of `scales` is entered by one block-causal pass over
      the tokens of every earlier scale too (collaborative decoding's
      refiner): those tokens run through the blocks but need no head.
  """
  c, f, v, d = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size, cfg.depth
  lay = layout(cfg.patch_nums)
  scales = range(lay.num_scales) if scales is None else scales
  until = lay.num_scales if cfg_until is None else cfg_until
  ada = 2 * c * 6 * c * (1 if cfg.shared_aln else d)
  body = lambda end: d * (2 * (4 * c * c + 2 * c * f) + 4 * end * c)
  total = 0
  for si in scales:
    l, end = lay.lengths[si], lay.ends[si]
    rows = 2 if si < until else 1
    blocks = l * body(end)
    embed = l * 2 * cfg.cvae * c if si > 0 else 0
    if prefill and si == scales[0]:
      blocks += sum(lay.lengths[j] * body(lay.ends[j]) for j in range(si))
      embed = (end - lay.first_l) * 2 * cfg.cvae * c
    total += rows * (blocks + l * 2 * c * v + ada + 2 * c * 2 * c) + embed
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


def sample_flops(var_cfg: VARConfig, vae_cfg: VQVAEConfig, *,
                 drafter: VARConfig | None = None, draft_steps=None,
                 cfg_until=None) -> dict:
  """{'transformer', 'decoder', 'total'} FLOPs per sampled image.

  With `drafter`, collaborative decoding: the drafter's scales
  0..draft_steps-1 plus the refiner `var_cfg`'s prefill and later scales.
  """
  if drafter is None:
    t = var_sample_flops(var_cfg, cfg_until=cfg_until)
  else:
    k = len(var_cfg.patch_nums)
    t = (var_sample_flops(drafter, range(draft_steps), cfg_until) +
         var_sample_flops(var_cfg, range(draft_steps, k), cfg_until,
                          prefill=True))
  dec = decoder_flops(vae_cfg)
  return {"transformer": t, "decoder": dec, "total": t + dec}
