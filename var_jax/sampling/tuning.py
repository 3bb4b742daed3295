"""CPU tuning of the sampling programs: measured on request, then passed in.

Which compiler options and decoder form are fastest differs between CPUs
(docs/performance.md has the figures): XLA's default library for
convolutions (YNNPACK) or its own Eigen kernels, the VQVAE decoder on the
whole batch or one image at a time, and whether bfloat16 matmuls pay at
all. `probe` measures the candidates (one transformer matmul and one
full-resolution decoder block each, interleaved, fastest of several runs);
`var-jax tune` runs it and stores the result in a JSON file of plans keyed
by `plan_key`, which the sampling commands read. The library never
measures or reads the file by itself: `Sampler(..., tuning=plan)` takes a
`CpuPlan`, and without one XLA's defaults apply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

from var_jax import io
from var_jax.errors import UserError
from var_jax.models.var import vqvae
from var_jax.models.vqgan import ResnetBlock


class TuningError(UserError):
  """A plan file that cannot be used."""


PLAN_FILE = "cpu_plans.json"
# XLA's CPU compiler sends dots and convolutions to YNNPACK by default; an
# empty fusion-type list keeps them in XLA's own (Eigen) kernels.
NO_YNN = (("xla_cpu_experimental_ynn_fusion_type", ""),)
_CANDIDATES = {"xla-default": (), "no-ynnpack": NO_YNN}
# A candidate replaces the default only when this much faster (noise guard).
_MARGIN = 0.05
# bfloat16 counts as slower than float32 below this speed ratio.
SLOWER = 0.9


@dataclasses.dataclass(frozen=True)
class CpuPlan:
  """Compiler options and the decoder form of the two sampling programs.

  Attributes:
    transformer_options: XLA compiler options of the scale loop program,
      as sorted (name, value) pairs; () is XLA's defaults.
    decoder_options: the same for the VQVAE decoder program.
    decoder_batched: decode the whole batch at once (True) or one image at a
      time (`vqvae.one_image_at_a_time`).
    bf16_speedup: for a bfloat16 plan, the probe's float32 matmul time over
      its bfloat16 time under the chosen options (< 1: bfloat16 is slower on
      this CPU); None otherwise.
  """

  transformer_options: tuple[tuple[str, str], ...] = ()
  decoder_options: tuple[tuple[str, str], ...] = ()
  decoder_batched: bool = True
  bf16_speedup: float | None = dataclasses.field(default=None, compare=False)

  def describe(self) -> dict:
    """JSON-able summary (benchmarks print it)."""
    name = {v: k for k, v in _CANDIDATES.items()}
    return {"transformer": name.get(self.transformer_options, "custom"),
            "decoder": name.get(self.decoder_options, "custom"),
            "decoder_batched": self.decoder_batched,
            "bf16_speedup": self.bf16_speedup}


def plan_file(cache_root: str) -> str:
  """The plan file under a cache directory (`var_jax.caches.cache_root`)."""
  return os.path.join(cache_root, PLAN_FILE)


def _digest(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def plan_key(embed_dim: int, dtype: str, vae_ch: int, image_res: int,
             batch: int) -> str:
  """What a plan depends on: the CPU (model name and instruction-set
  flags), threads, the jax, jaxlib and var-jax versions, the candidate set
  this code times, model widths, dtype, and whether a call holds one image
  or several. A plan stored under another key is never read: after any of
  these changed, sampling uses XLA's defaults until `var-jax tune` runs."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  from var_jax import __version__  # pylint: disable=import-outside-toplevel
  batch_kind = "b1" if batch == 1 else "bN"
  candidates = json.dumps(sorted(_CANDIDATES.items()))
  return "|".join([_cpu_name(), f"cpuflags-{_digest(_cpu_flags())}",
                   f"cpus{os.cpu_count()}", f"jax{jax.__version__}",
                   f"jaxlib{jaxlib.__version__}", f"var-jax{__version__}",
                   f"candidates-{_digest(candidates)}", f"C{embed_dim}",
                   dtype, f"ch{vae_ch}", f"res{image_res}", batch_kind])


def _cpu_flags() -> str:
  """The CPU's instruction-set flags (Linux), else the machine name."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
      for line in fh:
        if line.startswith(("flags", "Features")):
          return " ".join(sorted(line.split(":", 1)[1].split()))
  except OSError:
    pass
  return platform.machine()


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
      for line in fh:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def read_plans(path) -> dict:
  """The plans stored in the JSON file `path` ({} when there is none).

  Raises:
    TuningError: the file exists but is not a JSON object of plans.
  """
  path = io.as_path(path)
  try:
    data = json.loads(path.read_text())
  except (FileNotFoundError, NotADirectoryError):
    return {}
  except (OSError, ValueError) as e:
    raise TuningError(f"{path}: not a readable plan file ({e}); delete it "
                      "or run `var-jax tune` again") from None
  if not isinstance(data, dict):
    raise TuningError(f"{path}: not a plan file (expected a JSON object)")
  return data


def stored_plan(path, key: str) -> CpuPlan | None:
  """The plan stored under `key` in `path`, or None.

  Raises:
    TuningError: an unreadable file or a malformed entry, naming it.
  """
  rec = read_plans(path).get(key)
  if rec is None:
    return None
  try:
    return _from_json(rec)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise TuningError(f"{path}: the plan for this machine is malformed ({e});"
                      " run `var-jax tune` again") from None


def store_plan(path, key: str, record: dict) -> None:
  """Adds (or replaces) `record` under `key` in the plan file `path`."""
  try:
    plans = read_plans(path)
  except TuningError:
    plans = {}
  plans[key] = record
  io.write_text(path, json.dumps(plans, indent=1, sort_keys=True))


def _from_json(rec) -> CpuPlan:
  """A stored plan; TypeError/ValueError unless it is one this code makes."""
  if not isinstance(rec, dict):
    raise TypeError(f"expected an object, got {type(rec).__name__}")

  def opts(name):
    raw = rec[name]
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
      raise TypeError(f"{name} must map option names to strings")
    value = tuple(sorted(raw.items()))
    if value not in _CANDIDATES.values():  # Never hand XLA unknown flags.
      raise ValueError(f"{name} {raw} is not a candidate of this version")
    return value

  batched, speed = rec["decoder_batched"], rec.get("bf16_speedup")
  if not isinstance(batched, bool):
    raise TypeError("decoder_batched must be true or false")
  if speed is not None and (isinstance(speed, bool)
                            or not isinstance(speed, (int, float))):
    raise TypeError("bf16_speedup must be a number or null")
  return CpuPlan(opts("transformer_options"), opts("decoder_options"),
                 batched, None if speed is None else float(speed))


def _fastest(programs: dict, args: dict, rounds: int) -> dict:
  """Seconds per call of each compiled program: min over interleaved rounds."""
  best = {}
  for name, fn in programs.items():  # Warm-up (first-touch allocation).
    jax.block_until_ready(fn(*args[name]))
  for _ in range(rounds):
    for name, fn in programs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args[name]))
      best[name] = min(best.get(name, float("inf")),
                       time.perf_counter() - t0)
  return best


def _compile(fn, args, options):
  lowered = jax.jit(fn).lower(*args)
  return lowered.compile(compiler_options=dict(options)) if options else \
      lowered.compile()


def _pick(times: dict, default: str) -> str:
  """The fastest, unless it beats `default` by less than the margin."""
  best = min(times, key=times.get)
  if times[best] < times[default] * (1 - _MARGIN):
    return best
  return default


def probe(embed_dim: int, dtype: str, vae_ch: int, image_res: int,
          batch: int) -> tuple[CpuPlan, dict]:
  """Measures the candidates now; returns the plan and its JSON record.

  Transformer: a (1024, C) x (C, 4C) matmul in `dtype` (float32
  accumulation) with the weight stored (4C, C), as the sampler's MLP.
  Decoder: one full-resolution ResNet block (the decoder's dominant work) on 2 images, whole batch and one image at a
  time, under each candidate. A candidate whose options this jaxlib rejects
  is skipped.
  """
  dt = jnp.dtype(dtype)
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (1024, embed_dim), jnp.float32)
  # Stored (out, in), as the sampler keeps the block matrices.
  w = jax.random.normal(k2, (4 * embed_dim, embed_dim), jnp.float32) * 0.02
  mm = lambda a, b: jnp.matmul(a.astype(dt), b.T.astype(dt),
                               preferred_element_type=jnp.float32)
  block = ResnetBlock(vae_ch, vae_ch, rngs=nnx.Rngs(0))
  gd, st = nnx.split(block)
  imgs = jax.random.normal(k1, (2, image_res, image_res, vae_ch), jnp.float32)
  whole = lambda s, h: nnx.merge(gd, s)(h)
  one = lambda s, h: vqvae.one_image_at_a_time(nnx.merge(gd, s), h)

  progs, args = {}, {}
  for name, options in _CANDIDATES.items():
    try:
      progs[f"mm/{name}"] = _compile(mm, (x, w), options)
      args[f"mm/{name}"] = (x, w)
      forms = (("batched", whole),) + ((("per-image", one),) if batch > 1
                                       else ())
      for form, fn in forms:
        progs[f"dec/{name}/{form}"] = _compile(fn, (st, imgs), options)
        args[f"dec/{name}/{form}"] = (st, imgs)
    except Exception:  # pylint: disable=broad-except
      # An option this jaxlib does not know: the candidate does not exist.
      for k in [k for k in progs if f"/{name}" in k]:
        progs.pop(k), args.pop(k)
  times = _fastest(progs, args, rounds=3)
  mm_times = {k.split("/")[1]: v for k, v in times.items()
              if k.startswith("mm/")}
  dec_times = {k[len("dec/"):]: v for k, v in times.items()
               if k.startswith("dec/")}
  t_name = _pick(mm_times, "xla-default")
  # The library by its best form; then one image at a time only when clearly
  # faster (the whole batch gains with batch size, the probe decodes two).
  libs = {}
  for k, v in dec_times.items():
    lib = k.split("/")[0]
    libs[lib] = min(libs.get(lib, float("inf")), v)
  d_name = _pick(libs, "xla-default")
  forms = {k.split("/")[1]: v for k, v in dec_times.items()
           if k.startswith(d_name + "/")}
  d_form = _pick(forms, "batched")
  speedup = None
  if dt != jnp.float32:
    # Whether the reduced precision pays at all here, under the same
    # options: both dtypes interleaved, more rounds (a wrong "slower" note
    # would mislead).
    mm32 = lambda a, b: jnp.matmul(a, b.T, preferred_element_type=jnp.float32)
    pair = {"f32": _compile(mm32, (x, w), _CANDIDATES[t_name]),
            "low": progs[f"mm/{t_name}"]}
    t = _fastest(pair, {"f32": (x, w), "low": (x, w)}, rounds=7)
    times["mm/float32"] = t["f32"]
    speedup = round(t["f32"] / t["low"], 3)
  plan = CpuPlan(_CANDIDATES[t_name], _CANDIDATES[d_name],
                 d_form == "batched", speedup)
  record = {"transformer_options": dict(plan.transformer_options),
            "decoder_options": dict(plan.decoder_options),
            "decoder_batched": plan.decoder_batched,
            "bf16_speedup": speedup,
            "seconds": {k: round(v, 4) for k, v in sorted(times.items())},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
  return plan, record
