"""What `var-jax t2i` does: load an Infinity directory, encode the prompts,
draw, decode, write.

One prompt goes to one image file. Many prompts go to a folder, one
`NNNNNN.png` per prompt (its line in the job), written like `sample-many`:
batches split over the local devices, each image written atomically, a
`meta.json` holding the settings, and the folder locked while a run writes
it; running the same command again draws only the missing images, and other
settings are refused. Prompt i always uses the keys of index i and the text
is padded to one length for the whole job, so the images do not depend on
the batch size or the device count.
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax import io, locks
from var_jax.convert.infinity import directory
from var_jax.data.text import TextTokenizer
from var_jax.errors import UserError
from var_jax.models.infinity import schedules
from var_jax.progress import progress_bar
from var_jax.sampling import many
from var_jax.sampling.images import save_image, to_uint8
from var_jax.models.infinity.t5 import MATRICES, T5Encoder
from var_jax.sampling.infinity.sampler import (InfinityOptions,
                                               InfinitySampler, cast)

# Text lengths the encoder and the sampler are compiled for: a job pads its
# prompts to the first that holds the longest one.
TEXT_LENGTHS = (32, 64, 128, 256, 512)


class Tokens(NamedTuple):
  """A job's prompts as token ids, padded to one length for the job."""
  ids: np.ndarray  # (N, T) int32.
  mask: np.ndarray  # (N, T) int32.
  null_ids: np.ndarray | None  # The negative prompt, (1, T).
  null_mask: np.ndarray | None


def text_length(longest: int, limit: int) -> int:
  """The padded text length of a job whose longest prompt (with its end
  token) has `longest` tokens."""
  return min([t for t in TEXT_LENGTHS if t >= longest] + [limit])


class Drawer:
  """A loaded model directory: prompts in, images out, on the local devices
  (weights replicated, each batch split over them)."""

  def __init__(self, ckpt, opts: InfinityOptions):
    models = directory.load(ckpt)
    # The longest text both the encoder and the transformer's null text
    # (for guidance) cover.
    self.limit = min(models.text_encoder.cfg.max_length,
                     models.transformer.cfg.text_maxlen)
    self.tokenizer = TextTokenizer.from_path(models.tokenizer_file,
                                             self.limit)
    self.sampler = InfinitySampler(models.transformer, models.tokenizer, opts)
    self._encode, self._t5_state = text_program(models.text_encoder,
                                                opts.dtype)
    self.batch_sharding = None

  def shard(self) -> None:
    """Replicates the weights over the local devices."""
    self.batch_sharding = many.replicate_weights(self.sampler)
    replicated = jax.sharding.NamedSharding(self.batch_sharding.mesh,
                                            jax.sharding.PartitionSpec())
    self._t5_state = jax.device_put(self._t5_state, replicated)

  def tokens(self, prompts: list[str], negative: str | None) -> Tokens:
    """Every prompt (and the negative one) as ids, checked before any draw.

    Raises:
      DataError: an empty prompt or one longer than the encoder takes.
    """
    ids, mask = self.tokenizer.encode(prompts)
    nid = nmask = None
    longest = int(mask.sum(1).max())
    if negative is not None:
      nid, nmask = self.tokenizer.encode([negative])
      longest = max(longest, int(nmask.sum()))
    t = text_length(longest, self.limit)
    cut = lambda a: None if a is None else a[:, :t]
    return Tokens(cut(ids), cut(mask), cut(nid), cut(nmask))

  def _put(self, a):
    a = jnp.asarray(a)
    return a if self.batch_sharding is None else jax.device_put(
        a, self.batch_sharding)

  def draw(self, tok: Tokens, rows: np.ndarray, *, seed: int, grids,
           ratio: float) -> np.ndarray:
    """uint8 images (len(rows), H, W, 3) of the prompts at `rows` (their
    indices in the job, which their keys are folded with)."""
    ids, mask = self._put(tok.ids[rows]), self._put(tok.mask[rows])
    text = self._encode(self._t5_state, ids, mask)
    null = null_mask = None
    if tok.null_ids is not None:
      n = len(rows)
      null_mask = self._put(np.repeat(tok.null_mask, n, 0))
      null = self._encode(self._t5_state,
                          self._put(np.repeat(tok.null_ids, n, 0)), null_mask)
    out = self.sampler(text, mask, seed=seed, grids=grids, ratio=ratio,
                       sample_ids=self._put(rows.astype(np.int32)),
                       null_text_BTc=null, null_mask_BT=null_mask)
    return to_uint8(np.asarray(out.images_BHWC))


def text_program(encoder: T5Encoder, dtype: str):
  """(jitted encode(state, ids_BT, mask_BT) -> states_BTC float32, state):
  the text encoder as t2i runs it. With bfloat16, its matrices are stored
  and multiplied in bfloat16 (float32 sums), as the official tool keeps
  flan-t5 in half precision."""
  graph, state = nnx.split(encoder)
  if dtype != "float32":
    pure = nnx.to_pure_dict(state)
    for name in MATRICES:
      pure[name] = cast(pure[name], dtype)
    nnx.replace_by_pure_dict(state, pure)
  return jax.jit(lambda st, ids, mask: nnx.merge(graph, st)(
      ids, mask, dtype=jnp.dtype(dtype))), state


def text_to_image(ckpt, prompts: list[str], opts: InfinityOptions, *,
                  seed: int, resolution: int, ratio: float,
                  negative: str | None = None) -> np.ndarray:
  """uint8 images (B, H, W, 3), one per prompt, drawn one at a time.

  Raises:
    UserError, CheckpointError, DataError: bad prompts or options, a
      directory that is not an Infinity model (all before any drawing).
  """
  drawer = Drawer(ckpt, opts)
  tok = drawer.tokens(prompts, negative)
  grids = schedules.schedule(ratio, resolution)
  out = []
  bar = progress_bar(len(prompts), unit="img", desc="t2i")
  for i in range(len(prompts)):
    out.append(drawer.draw(tok, np.asarray([i]), seed=seed, grids=grids,
                           ratio=ratio)[0])
    bar.update(1)
  bar.close()
  return np.stack(out)


def prompts_digest(prompts: list[str]) -> str:
  """What identifies a job's prompts (their text and order)."""
  text = json.dumps(prompts, ensure_ascii=False)
  return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def image_name(i: int) -> str:
  return f"{i:06d}.png"


def _in_use(out, pid: int) -> str:
  shown = f"pid {pid}" if pid > 0 else "another process"
  return (f"{out} is being written by another t2i ({shown}); wait for it to "
          "finish or stop it")


def _clear(out) -> None:
  """Removes a previous job's images and settings (--overwrite)."""
  for p in out.iterdir():
    if p.name == "meta.json" or (p.suffix == ".png" and p.stem.isdigit()):
      p.unlink()


def check_folder(out, meta: dict, *, overwrite: bool) -> None:
  """Refuses, before any model is loaded, a folder another run is writing,
  or (without `overwrite`) one holding other files or another job.

  Raises:
    UserError: naming the folder and what is in the way.
  """
  out = io.as_path(out)
  pid = locks.holder_pid(out)
  if pid is not None:
    raise locks.OutputInUseError(_in_use(out, pid))
  if overwrite or not out.is_dir():
    return
  if (out / "meta.json").exists():
    many.check_meta(out, meta)
    return
  others = [p.name for p in out.iterdir() if p.name != locks.LOCK_NAME]
  if others:
    raise UserError(f"--out {out} holds files of something else "
                    f"({', '.join(sorted(others)[:3])}); give a new or empty "
                    "folder")


def t2i_folder(drawer: Drawer, prompts: list[str], *, seed: int,
               resolution: int, ratio: float, negative: str | None,
               batch: int, out, meta: dict, overwrite: bool = False,
               log=print) -> int:
  """Draws (or finishes drawing) one image per prompt into `out`; returns
  the number of images the folder holds.

  Args:
    batch: prompts per call, over all local devices (a multiple of their
      count).
    meta: the settings that must match when resuming (JSON values); the
      prompts' digest and count are added.

  Raises:
    UserError, DataError: bad prompts, batch or folder, before any write.
  """
  out = io.as_path(out)
  many.check_devices(batch)
  tok = drawer.tokens(prompts, negative)
  grids = schedules.schedule(ratio, resolution)
  meta = json.loads(json.dumps(dict(meta, prompts=prompts_digest(prompts),
                                    total=len(prompts)),
                               default=many.plain_json))
  check_folder(out, meta, overwrite=overwrite)
  with locks.DirLock(out, describe=lambda pid: _in_use(out, pid), shown=out):
    if overwrite:
      _clear(out)
    many.check_meta(out, meta)
    many.write_meta(out, meta)
    todo = [i for i in range(len(prompts))
            if not (out / image_name(i)).exists()]
    if todo:
      drawer.shard()
    bar = progress_bar(len(prompts), initial=len(prompts) - len(todo),
                       unit="img", desc="t2i")
    for start in range(0, len(todo), batch):
      rows = np.asarray(todo[start:start + batch])
      # The last batch is padded to the full size (one compiled shape).
      padded = np.concatenate([rows, np.repeat(rows[-1:], batch - len(rows))])
      images = drawer.draw(tok, padded, seed=seed, grids=grids, ratio=ratio)
      for i, img in zip(rows, images):
        save_image(out / image_name(int(i)), img)
      bar.update(len(rows))
    bar.close()
  log(f"wrote {len(todo)} images to {out} ({len(prompts) - len(todo)} were "
      "there already)" if len(todo) < len(prompts) else
      f"wrote {len(prompts)} images to {out}")
  return len(prompts)
