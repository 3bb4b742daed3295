"""var-jax from Python: sample a grid of digits, then edit one of them.

Uses the small digits model bundled in the package (no download; a CPU is
enough, and most of the run is compiling the two programs):

    python examples/quickstart.py [--out-dir DIR] [--seed N]

writes, in DIR (default: the current directory),

    grid.png    one sample of each digit class 0..9, in a row
    edited.png  the sample of class 3, and next to it the same image with
                the centre of its 4x4 token grid redrawn as class 8
                (zero-shot class-conditional inpainting)

Every image in var-jax's Python API is float32 (B, H, W, 3) in [0, 1]: the
sampler's output, the editor's input and output. The edit below starts from
the sampler's own output, so no conversion is needed on the way in; Pillow
gets 8-bit pixels on the way out.
"""

import argparse
import pathlib
import sys

import numpy as np
from PIL import Image

import var_jax
from var_jax.errors import VarJaxError
from var_jax.sampling.var.edit import box_mask, zero_shot_edit


def to_png(images_BHWC, path):
  """Writes images side by side as one 8-bit RGB PNG."""
  images = np.clip(np.asarray(images_BHWC, np.float32), 0.0, 1.0)
  row = np.concatenate(list(images), axis=1)  # (H, B * W, 3)
  Image.fromarray(np.round(row * 255).astype(np.uint8)).save(path)


def seed(text):
  """A seed in [0, 2**32), as the sampler takes it."""
  try:
    value = int(text)
  except ValueError:
    value = -1
  if not 0 <= value < 2 ** 32:
    raise argparse.ArgumentTypeError(
        f"expected an integer in [0, 2**32), got {text!r}")
  return value


class OneLineParser(argparse.ArgumentParser):
  """Usage errors as one line (`quickstart.py: error: ...`), exit 2."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None):
  parser = OneLineParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out-dir", default=".", help="where to write the PNGs")
  parser.add_argument("--seed", type=seed, default=0,
                      help="sampling seed in [0, 2**32)")
  args = parser.parse_args(argv)  # A bad flag: one usage line, exit 2.
  try:
    run(args)
  except VarJaxError as e:  # var-jax's errors are one line.
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    sys.exit(2)


def run(args):
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)

  model = var_jax.load()  # The bundled digits model; "d16" etc. download.
  opts = var_jax.SampleOptions(cfg=1.5, top_k=900, top_p=0.96)
  sampler = var_jax.Sampler(model.vae, model.var, opts)

  # One sample per class. The same seed gives the same tokens for any batch.
  classes = list(range(model.config.var.num_classes))
  grid = sampler(classes, seed=args.seed)
  to_png(grid.images_BHWC, out_dir / "grid.png")

  # Keep the tokens outside a centred box of the last scale's grid, redraw
  # the inside conditioned on another class.
  source = np.asarray(grid.images_BHWC)[3:4]
  side = model.config.var.patch_nums[-1]
  mask = box_mask(side, (0.25, 0.25, 0.75, 0.75), inpaint=True)
  edit = zero_shot_edit(sampler, model.vae, source, mask, labels=[8],
                        seed=args.seed)
  to_png(np.concatenate([source, np.asarray(edit.images_BHWC)]),
         out_dir / "edited.png")

  kept = int(mask.sum())
  print(f"wrote {out_dir / 'grid.png'} ({len(classes)} classes) and "
        f"{out_dir / 'edited.png'} (class 3, {side * side - kept} of "
        f"{side * side} last-scale tokens redrawn as class 8)")


if __name__ == "__main__":
  main()
