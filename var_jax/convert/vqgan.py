"""Name tables of the VQGAN encoder/decoder stack (`models/vqgan.py`), as the
official tokenizers store it: VAR's VQVAE (with attention) and Infinity's BSQ
tokenizer (without, and with each convolution and norm one level deeper:
`X.conv.weight`, `X.norm.weight`, given as `conv_wrap` / `norm_wrap`)."""

from __future__ import annotations

from var_jax.convert.rules import Rule, conv_rules, norm_rules


def resnet_rules(off: str, ours: tuple, cin: int, cout: int,
                 conv_wrap: str = "", norm_wrap: str = "") -> list[Rule]:
  """A residual block (`ResnetBlock`)."""
  r = (norm_rules(f"{off}.norm1", ours + ("norm1",), cin, norm_wrap)
       + conv_rules(f"{off}.conv1", ours + ("conv1",), cin, cout, 3,
                    conv_wrap)
       + norm_rules(f"{off}.norm2", ours + ("norm2",), cout, norm_wrap)
       + conv_rules(f"{off}.conv2", ours + ("conv2",), cout, cout, 3,
                    conv_wrap))
  if cin != cout:
    r += conv_rules(f"{off}.nin_shortcut", ours + ("nin_shortcut",), cin,
                    cout, 1, conv_wrap)
  return r


def _attn_rules(off, ours, c):
  return (norm_rules(f"{off}.norm", ours + ("norm",), c)
          + conv_rules(f"{off}.qkv", ours + ("qkv",), c, 3 * c, 1)
          + conv_rules(f"{off}.proj_out", ours + ("proj_out",), c, c, 1))


def stack_rules(ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                image_channels: int, z_channels: int, attention: bool,
                conv_wrap: str = "", norm_wrap: str = "") -> list[Rule]:
  """Every tensor of the encoder, then the decoder, in the official order."""
  n = len(ch_mult)
  w = (conv_wrap, norm_wrap)

  def mid(off, ours, c):
    return (resnet_rules(f"{off}.block_1", ours + ("block_1",), c, c, *w)
            + (_attn_rules(f"{off}.attn_1", ours + ("attn_1",), c)
               if attention else [])
            + resnet_rules(f"{off}.block_2", ours + ("block_2",), c, c, *w))

  r = conv_rules("encoder.conv_in", ("encoder", "conv_in"), image_channels,
                 ch, 3, conv_wrap)
  block_in = ch
  for i in range(n):
    for j in range(num_res_blocks):
      r += resnet_rules(f"encoder.down.{i}.block.{j}",
                        ("encoder", "down", i, "block", j), block_in,
                        ch * ch_mult[i], *w)
      block_in = ch * ch_mult[i]
      if attention and i == n - 1:
        r += _attn_rules(f"encoder.down.{i}.attn.{j}",
                         ("encoder", "down", i, "attn", j), block_in)
    if i != n - 1:
      r += conv_rules(f"encoder.down.{i}.downsample.conv",
                      ("encoder", "down", i, "resample", "conv"), block_in,
                      block_in, 3, conv_wrap)
  r += mid("encoder.mid", ("encoder", "mid"), block_in)
  r += norm_rules("encoder.norm_out", ("encoder", "norm_out"), block_in,
                  norm_wrap)
  r += conv_rules("encoder.conv_out", ("encoder", "conv_out"), block_in,
                  z_channels, 3, conv_wrap)
  block_in = ch * ch_mult[-1]
  r += conv_rules("decoder.conv_in", ("decoder", "conv_in"), z_channels,
                  block_in, 3, conv_wrap)
  r += mid("decoder.mid", ("decoder", "mid"), block_in)
  for i in reversed(range(n)):
    for j in range(num_res_blocks + 1):
      r += resnet_rules(f"decoder.up.{i}.block.{j}",
                        ("decoder", "up", i, "block", j), block_in,
                        ch * ch_mult[i], *w)
      block_in = ch * ch_mult[i]
      if attention and i == n - 1:
        r += _attn_rules(f"decoder.up.{i}.attn.{j}",
                         ("decoder", "up", i, "attn", j), block_in)
    if i != 0:
      r += conv_rules(f"decoder.up.{i}.upsample.conv",
                      ("decoder", "up", i, "resample", "conv"), block_in,
                      block_in, 3, conv_wrap)
  r += norm_rules("decoder.norm_out", ("decoder", "norm_out"), block_in,
                  norm_wrap)
  r += conv_rules("decoder.conv_out", ("decoder", "conv_out"), block_in,
                  image_channels, 3, conv_wrap)
  return r
