#!/usr/bin/env python3
"""Convert official VAR/VQVAE .pth checkpoints (no torch needed).

Same flags as `var-jax convert`:
  python tools/convert_torch_weights.py --vae vae_ch160v4096z32.pth \
      --var var_d16.pth --out checkpoints/d16
"""

import sys

from var_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(["convert", *sys.argv[1:]]))
