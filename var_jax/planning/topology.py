"""TPU slices by the names Cloud users type, as compile-only devices.

`parse("v5p-128")` gives the slice (64 chips on a 4x4x4 torus: v4 and v5p
names count TensorCores, two per chip; v5e and v6e names count chips);
`devices(slice_)` asks libtpu for compile-only devices of that topology, so
that a program can be compiled for a pod on a machine without TPUs. Chip
figures are the published ones: HBM per chip and dense bfloat16 peak.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re

from var_jax.errors import UserError
from var_jax.hardware import TPU_PEAK_BF16

GiB = 2 ** 30

# Environment for libtpu on a host without TPUs, where it only compiles: the
# accelerator and worker lookups it would log failures of, its lock that
# allows one process per host, and its log files.
COMPILE_ONLY_ENV = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_ACCELERATOR_TYPE": "v5litepod-1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_LOG_DIR": "disabled",  # Else every process leaves logs in /tmp.
}


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation as `get_topology_desc` and the Cloud console name it."""

  generation: str  # As in Cloud names: "v4", "v5e", "v5p", "v6e".
  hbm_bytes: int
  peak_bf16: float  # Dense FLOP/s per chip.
  cores_per_chip: int  # What one unit of the Cloud name counts.
  torus_dims: int  # 3 (v4, v5p) or 2 (v5e, v6e).


CHIPS = {
    "v4": Chip("v4", 32 * GiB, TPU_PEAK_BF16["v4"], 2, 3),
    "v5e": Chip("v5e", 16 * GiB, TPU_PEAK_BF16["v5e"], 1, 2),
    "v5p": Chip("v5p", 95 * GiB, TPU_PEAK_BF16["v5p"], 2, 3),
    "v6e": Chip("v6e", 32 * GiB, TPU_PEAK_BF16["v6e"], 1, 2),
}
# Other spellings of a generation (Cloud's accelerator types, device kinds).
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}

# Chips -> the slice shapes Cloud provisions (x, y[, z]).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8),
              64: (8, 8), 128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4),
              64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8), 384: (4, 8, 12),
              512: (8, 8, 8), 768: (8, 8, 12), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice (times `slices`, joined over the data-center network)."""

  name: str  # What the user typed, normalised ("v5p-128").
  chip: Chip
  shape: tuple[int, ...]  # Chips along each torus axis.
  slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    n = 1
    for s in self.shape:
      n *= s
    return n

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.slices

  @property
  def topology_name(self) -> str:
    return f"{self.chip.generation}:" + "x".join(map(str, self.shape))


def known_names(generation: str) -> list[str]:
  chip = CHIPS[generation]
  shapes = _SHAPES_3D if chip.torus_dims == 3 else _SHAPES_2D
  return [f"{generation}-{n * chip.cores_per_chip}" for n in shapes]


def parse(name: str, slices: int = 1) -> Slice:
  """"v5p-128", "v5e-256", "v5litepod-16" or "v5e:2x4" -> a `Slice`.

  Raises:
    UserError: an unknown generation, a size Cloud does not provision, or
      a malformed shape.
  """
  if not isinstance(slices, int) or slices < 1:
    raise UserError(f"--slices must be an integer >= 1, got {slices!r}")
  text = str(name).strip().lower()
  m = re.fullmatch(r"([a-z0-9]+)([-:])([0-9x]+)", text)
  gen = m and _ALIASES.get(m.group(1), m.group(1))
  if not m or gen not in CHIPS:
    raise UserError(f"unknown TPU topology {name!r}: expected a Cloud name "
                    f"such as v4-32, v5e-256, v5p-128, v6e-64 (generations "
                    f"{', '.join(CHIPS)}) or GEN:AxB[xC] such as v5e:2x4")
  chip = CHIPS[gen]
  shapes = _SHAPES_3D if chip.torus_dims == 3 else _SHAPES_2D
  if m.group(2) == ":":
    try:
      shape = tuple(int(s) for s in m.group(3).split("x"))
    except ValueError:
      shape = ()
    if shape not in shapes.values():
      known = ", ".join(f"{gen}:" + "x".join(map(str, s))
                        for s in shapes.values())
      raise UserError(f"unknown TPU topology {name!r}: {gen} slices are "
                      f"{chip.torus_dims}-D shapes Cloud provisions: {known}")
    return Slice(f"{gen}:{m.group(3)}", chip, shape, slices)
  count = int(m.group(3)) if m.group(3).isdigit() else -1
  chips, rem = divmod(count, chip.cores_per_chip)
  if count < 1 or rem or chips not in shapes:
    unit = ("TensorCores, two per chip" if chip.cores_per_chip == 2
            else "chips")
    raise UserError(f"unknown TPU slice {name!r}: {gen} names count {unit}; "
                    f"known sizes: {', '.join(known_names(gen))}")
  return Slice(f"{gen}-{count}", chip, shapes[chips], slices)


def libtpu_missing() -> str | None:
  """The one-line reason compile-only TPU devices are unavailable, or None."""
  if importlib.util.find_spec("libtpu") is None:
    return ("compiling for a TPU topology needs the TPU compiler: pip "
            "install libtpu (from a checkout: pip install '.[tpu]')")
  return None


def devices(slice_: Slice) -> list:
  """Compile-only devices of the slice (all slices), in libtpu's order.

  Raises:
    UserError: libtpu is missing or does not know the topology.
  """
  reason = libtpu_missing()
  if reason:
    raise UserError(reason)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  # v4 and v5p chips hold two TensorCores; "megacore" makes one device of
  # both, as a training job on them sees them.
  kwargs = {"chip_config_name": "megacore"} if (
      slice_.chip.cores_per_chip == 2) else {}
  if slice_.slices > 1:
    kwargs["num_slices"] = slice_.slices
  try:
    topo = topologies.get_topology_desc(
        topology_name=slice_.topology_name, platform="tpu", **kwargs)
  except Exception as e:  # libtpu raises XlaRuntimeError / ValueError.
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f"libtpu cannot describe {slice_.name} "
                    f"({slice_.topology_name}, {slice_.slices} slice(s)): "
                    f"{msg}") from None
  return list(topo.devices)
