"""How the sampler compiles on a CPU, chosen by a short measurement.

Which form is fastest differs between CPUs (measured, see the README's
benchmark tables): on one Intel Xeon, XLA's default library for
convolutions (YNNPACK) ran the VQVAE decoder 20% slower than XLA's own
(Eigen) convolutions and the decoder was fastest on the whole batch, while
on an AMD EPYC of an earlier session one image at a time was faster; for the
transformer's bfloat16 matmuls the default library (AMX kernels) was 2.2x
faster than the alternative. So instead of fixed defaults, `plan_for`
measures the candidates once per machine, model shape and dtype (15-40
s: one transformer matmul and one full-resolution decoder block per
candidate, interleaved, fastest of several runs) and keeps the answer in
`cpu_plans.json` beside the compilation cache (`var_jax.caches`).

`$VAR_JAX_CPU_PLAN` controls it: `auto` (default: measure once, then reuse),
`probe` (measure again and store), `off` (XLA's defaults for both programs
and the decoder one image at a time, the form before plans existed; the test
suite runs this way). Off the CPU the plan is always XLA's defaults with the
batched decoder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time

import jax
import jax.numpy as jnp

from var_jax import caches, io

PLAN_ENV = "VAR_JAX_CPU_PLAN"
PLAN_FILE = "cpu_plans.json"
_MODES = ("auto", "probe", "off")
# XLA's CPU compiler sends dots and convolutions to YNNPACK by default; an
# empty fusion-type list keeps them in XLA's own (Eigen) kernels.
NO_YNN = (("xla_cpu_experimental_ynn_fusion_type", ""),)
_CANDIDATES = {"xla-default": (), "no-ynnpack": NO_YNN}
# A candidate replaces the default only when this much faster (noise guard).
_MARGIN = 0.05
# bfloat16 counts as slower than float32 below this speed ratio.
SLOWER = 0.9
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CpuPlan:
  """Compiler options and the decoder form of the two sampling programs.

  Attributes:
    transformer_options: XLA compiler options of the scale loop program,
      as sorted (name, value) pairs; () is XLA's defaults.
    decoder_options: the same for the VQVAE decoder program.
    decoder_batched: decode the whole batch at once (True) or one image at a
      time (`vqvae.one_image_at_a_time`).
    source: "default" (not measured), "probe" (measured now), "cache".
    bf16_speedup: for a bfloat16 plan, the probe's float32 matmul time over
      its bfloat16 time under the chosen options (< 1: bfloat16 is slower on
      this CPU); None otherwise.
  """

  transformer_options: tuple[tuple[str, str], ...] = ()
  decoder_options: tuple[tuple[str, str], ...] = ()
  decoder_batched: bool = True
  source: str = dataclasses.field(default="default", compare=False)
  bf16_speedup: float | None = dataclasses.field(default=None, compare=False)

  def describe(self) -> dict:
    """JSON-able summary (benchmarks print it)."""
    name = {v: k for k, v in _CANDIDATES.items()}
    return {"transformer": name.get(self.transformer_options, "custom"),
            "decoder": name.get(self.decoder_options, "custom"),
            "decoder_batched": self.decoder_batched, "source": self.source,
            "bf16_speedup": self.bf16_speedup}


DEFAULT = CpuPlan()
# The plan `off` gives on CPU: what the sampler did before plans existed.
OFF = CpuPlan(decoder_batched=False, source="off")


def mode() -> str:
  """`$VAR_JAX_CPU_PLAN`, lower-cased; unknown values count as `auto`."""
  m = os.environ.get(PLAN_ENV, "auto").strip().lower() or "auto"
  if m not in _MODES:
    _log.warning("%s=%s is not one of %s; using auto", PLAN_ENV, m, _MODES)
    return "auto"
  return m


def machine_key(embed_dim: int, dtype: str, vae_ch: int, image_res: int,
                batch: int) -> str:
  """What a plan depends on: CPU, threads, JAX, model widths, dtype."""
  batch_kind = "b1" if batch == 1 else "bN"
  return "|".join([_cpu_name(), f"cpus{os.cpu_count()}",
                   f"jax{jax.__version__}", f"C{embed_dim}", dtype,
                   f"ch{vae_ch}", f"res{image_res}", batch_kind])


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
      for line in fh:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def plan_for(embed_dim: int, dtype: str, vae_ch: int, image_res: int,
             batch: int, *, cache_file: str | None = None) -> CpuPlan:
  """The plan for sampling `batch` images with these model widths.

  Args:
    embed_dim: the transformer width C (the probe times (1024, C) x (C, 4C)).
    dtype: the transformer compute dtype, "float32" or "bfloat16".
    vae_ch: the decoder's finest channel count (160 for the released VQVAE).
    image_res: output side in pixels (256 for patch_nums ending in 16).
    batch: images per call (1 needs no decoder form).
    cache_file: the JSON file of measured plans (default
      `caches.cache_root()/cpu_plans.json`).

  Returns:
    `DEFAULT` off the CPU, `OFF` when `$VAR_JAX_CPU_PLAN=off`, else the
    stored or freshly measured plan. An unreadable or unwritable cache costs
    a warning and a new measurement, never an error.
  """
  if jax.default_backend() != "cpu":
    return DEFAULT
  m = mode()
  if m == "off":
    return OFF
  path = cache_file or os.path.join(caches.cache_root(), PLAN_FILE)
  key = machine_key(embed_dim, dtype, vae_ch, image_res, batch)
  stored, why = _read(path)
  plan = None
  if m == "auto" and key in stored:
    try:
      plan = _from_json(stored[key], "cache")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      why = f"its stored entry is malformed ({e}); "
  if plan is None:
    _log.warning("var-jax: measuring this CPU for sampling (15-40 s, once; "
                 "%sto be kept in %s)", why, path)
    plan, record = probe(embed_dim, dtype, vae_ch, image_res, batch)
    stored[key] = record
    _write(path, stored)
  if plan.bf16_speedup is not None and plan.bf16_speedup < SLOWER:
    _log.warning("var-jax: on this CPU bfloat16 matmuls measured %.2fx the "
                 "speed of float32 (slower); --dtype float32 is faster here",
                 plan.bf16_speedup)
  return plan


def _from_json(rec, source: str) -> CpuPlan:
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
                 batched, source, None if speed is None else float(speed))


def _read(path: str) -> tuple[dict, str]:
  """(stored plans, "" or why the file could not be read, for the log)."""
  try:
    with open(path, encoding="utf-8") as fh:
      data = json.load(fh)
  except (FileNotFoundError, NotADirectoryError):
    return {}, ""
  except (OSError, ValueError) as e:
    return {}, f"{path} was unreadable ({e}); "
  return (data if isinstance(data, dict) else {}), ""


def _write(path: str, data: dict) -> None:
  try:
    io.write_text(path, json.dumps(data, indent=1, sort_keys=True))
  except OSError as e:  # WriteError included: a cache, never fatal.
    _log.warning("could not store the CPU plan in %s (%s); it will be "
                 "measured again next time", path, e)


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
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from var_jax.models.var import vqvae  # pylint: disable=import-outside-toplevel

  dt = jnp.dtype(dtype)
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (1024, embed_dim), jnp.float32)
  # Stored (out, in), as the sampler keeps the block matrices.
  w = jax.random.normal(k2, (4 * embed_dim, embed_dim), jnp.float32) * 0.02
  mm = lambda a, b: jnp.matmul(a.astype(dt), b.T.astype(dt),
                               preferred_element_type=jnp.float32)
  block = vqvae.ResnetBlock(vae_ch, vae_ch, rngs=nnx.Rngs(0))
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
    except Exception as e:  # pylint: disable=broad-except
      # An option this jaxlib does not know: the candidate does not exist.
      _log.info("CPU plan candidate %s unavailable: %s", name, e)
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
                 d_form == "batched", "probe", speedup)
  record = {"transformer_options": dict(plan.transformer_options),
            "decoder_options": dict(plan.decoder_options),
            "decoder_batched": plan.decoder_batched,
            "bf16_speedup": speedup,
            "seconds": {k: round(v, 4) for k, v in sorted(times.items())},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
  return plan, record
