"""The explicit table from official PyTorch state-dict names to our NNX tree.

Each `Rule` says where an official tensor lands (our path, and a layer index
for the stacked transformer blocks) and how its layout changes. Buffers the
official models carry but we compute (`lvl_1L`, the attention mask,
`zero_k_bias`) are listed as DERIVED and checked, never loaded.
"""

from __future__ import annotations

from var_jax.convert.rules import Rule, conv_rules
from var_jax.convert.vqgan import stack_rules
from var_jax.convert.rules import linear as _linear
from var_jax.convert.rules import same as _same
from var_jax.models.var.config import VARConfig, VQVAEConfig
from var_jax.models.var import quantizer as q


def _heads(a):  # (1, H, 1, 1) -> (H,)
  return a.reshape(-1)


def _gss(a):  # (1, 1, 6, C) -> (6, C)
  return a.reshape(a.shape[-2], a.shape[-1])


def vqvae_rules(cfg: VQVAEConfig) -> list[Rule]:
  """Every tensor of the official VQVAE state dict, in order."""
  z = cfg.z_channels
  r = stack_rules(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.in_channels,
                  z, attention=True)
  k = len(cfg.v_patch_nums)
  r.append(Rule("quantize.ema_vocab_hit_SV", ("quantize", "ema_vocab_hit_SV"),
                (k, cfg.vocab_size)))
  r.append(Rule("quantize.embedding.weight", ("quantize", "embedding",
                                              "embedding"),
                (cfg.vocab_size, z)))
  if abs(cfg.quant_resi) > 1e-6:
    n_phi = q.num_phi(cfg.share_quant_resi, k)
    for i in range(n_phi):
      if cfg.share_quant_resi == 0:
        off = f"quantize.quant_resi.{i}"
      elif cfg.share_quant_resi == 1:
        off = "quantize.quant_resi.qresi"
      else:
        off = f"quantize.quant_resi.qresi_ls.{i}"
      r += conv_rules(off, ("quantize", "quant_resi", i), z, z, 3)
  ks = cfg.quant_conv_ks
  r += conv_rules("quant_conv", ("quant_conv",), z, z, ks)
  r += conv_rules("post_quant_conv", ("post_quant_conv",), z, z, ks)
  return r


def var_rules(cfg: VARConfig) -> list[Rule]:
  """Every tensor of the official VAR state dict, in order."""
  c, l, f, h = cfg.embed_dim, cfg.seq_len, cfg.mlp_dim, cfg.num_heads
  k = len(cfg.patch_nums)
  r = [
      Rule("pos_start", ("pos_start",), (1, cfg.first_l, c)),
      Rule("pos_1LC", ("pos_1LC",), (1, l, c)),
      Rule("lvl_1L", (), (1, l)),
      Rule("attn_bias_for_masking", (), (1, 1, l, l)),
      Rule("word_embed.weight", ("word_embed", "kernel"), (c, cfg.cvae),
           _linear),
      Rule("word_embed.bias", ("word_embed", "bias"), (c,)),
      Rule("class_emb.weight", ("class_emb", "embedding"),
           (cfg.num_classes + 1, c)),
      Rule("lvl_embed.weight", ("lvl_embed", "embedding"), (k, c)),
  ]
  if cfg.shared_aln:
    r += [Rule("shared_ada_lin.1.weight", ("shared_ada_lin", "kernel"),
               (6 * c, c), _linear),
          Rule("shared_ada_lin.1.bias", ("shared_ada_lin", "bias"), (6 * c,))]
  for i in range(cfg.depth):
    b = f"blocks.{i}"
    blk = lambda name: ("blocks", name)  # noqa: E731
    if cfg.shared_aln:
      r.append(Rule(f"{b}.ada_gss", blk("ada_gss"), (1, 1, 6, c), _gss, i))
    r += [
        Rule(f"{b}.attn.scale_mul_1H11", blk("scale_mul"), (1, h, 1, 1),
             _heads, i),
        Rule(f"{b}.attn.q_bias", blk("q_bias"), (c,), _same, i),
        Rule(f"{b}.attn.v_bias", blk("v_bias"), (c,), _same, i),
        Rule(f"{b}.attn.zero_k_bias", (), (c,)),
        Rule(f"{b}.attn.mat_qkv.weight", blk("mat_qkv"), (3 * c, c), _linear,
             i),
        Rule(f"{b}.attn.proj.weight", blk("proj_w"), (c, c), _linear, i),
        Rule(f"{b}.attn.proj.bias", blk("proj_b"), (c,), _same, i),
        Rule(f"{b}.ffn.fc1.weight", blk("fc1_w"), (f, c), _linear, i),
        Rule(f"{b}.ffn.fc1.bias", blk("fc1_b"), (f,), _same, i),
        Rule(f"{b}.ffn.fc2.weight", blk("fc2_w"), (c, f), _linear, i),
        Rule(f"{b}.ffn.fc2.bias", blk("fc2_b"), (c,), _same, i),
    ]
    if not cfg.shared_aln:
      r += [Rule(f"{b}.ada_lin.1.weight", blk("ada_w"), (6 * c, c), _linear,
                 i),
            Rule(f"{b}.ada_lin.1.bias", blk("ada_b"), (6 * c,), _same, i)]
  r += [
      Rule("head_nm.ada_lin.1.weight", ("head_nm", "kernel"), (2 * c, c),
           _linear),
      Rule("head_nm.ada_lin.1.bias", ("head_nm", "bias"), (2 * c,)),
      Rule("head.weight", ("head", "kernel"), (cfg.vocab_size, c), _linear),
      Rule("head.bias", ("head", "bias"), (cfg.vocab_size,)),
  ]
  return r
