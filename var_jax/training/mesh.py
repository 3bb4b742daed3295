"""The device mesh ('data', 'fsdp') and multi-process start-up.

One mesh is built once from a `--mesh data=D,fsdp=F` flag. Parameters are
sharded over 'fsdp' (their declared `out_sharding` names) and replicated over
'data'; the batch is split over both axes, so D * F devices each see
global_batch / (D * F) examples.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from var_jax.errors import UserError

log = logging.getLogger(__name__)

AXES = ("data", "fsdp")


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
  """'data=D,fsdp=F' -> sizes; one size may be -1 (inferred), None = all data.

  Raises:
    UserError: on syntax errors or sizes that do not multiply to the device
      count.
  """
  if not spec:
    return {"data": num_devices, "fsdp": 1}
  sizes: dict[str, int] = {}
  for part in spec.split(","):
    name, sep, value = part.strip().partition("=")
    if not sep or name not in AXES or name in sizes:
      raise UserError(f"bad --mesh {spec!r}: expected data=D,fsdp=F")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise UserError(f"bad --mesh {spec!r}: {value!r} is not an integer"
                      ) from None
    if sizes[name] == 0 or sizes[name] < -1:
      raise UserError(f"bad --mesh {spec!r}: sizes must be positive (or -1)")
  for name in AXES:  # An omitted axis takes the remaining devices.
    if name not in sizes:
      sizes[name] = 1 if -1 in sizes.values() else -1
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  if sum(v == -1 for v in sizes.values()) > 1:
    raise UserError(f"bad --mesh {spec!r}: at most one size may be -1")
  if -1 in sizes.values():
    if num_devices % known:
      raise UserError(f"--mesh {spec} does not divide the {num_devices} "
                      "devices")
    sizes = {k: num_devices // known if v == -1 else v
             for k, v in sizes.items()}
  total = sizes["data"] * sizes["fsdp"]
  if total != num_devices:
    raise UserError(f"--mesh {spec} needs {total} devices but "
                    f"{num_devices} are available "
                    f"({jax.process_count()} process(es))")
  return {k: sizes[k] for k in AXES}


def make_mesh(spec: str | None, devices=None) -> Mesh:
  """The training mesh over all (global) devices.

  On a TPU torus an axis may span parts of several physical axes (8 ways
  on a 4x4x4 slice); over several slices 'data' runs across them (the
  data-center network carries only the gradient reduction).

  Raises:
    UserError: a bad spec, or sizes the devices cannot be laid out as (the
      message lists the shapes that can).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec, len(devices))
  grid = _device_grid((sizes["data"], sizes["fsdp"]), devices)
  if grid is None:
    n = len(devices)
    fits = [f"data={d},fsdp={n // d}" for d in range(1, n + 1)
            if n % d == 0 and _device_grid((d, n // d), devices) is not None]
    raise UserError(f"--mesh data={sizes['data']},fsdp={sizes['fsdp']} "
                    f"cannot be laid out on these {n} devices; shapes that "
                    f"fit: {' '.join(fits) or 'none'}")
  return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def _device_grid(shape: tuple[int, int], devices: list):
  """Devices arranged as `shape` (data, fsdp), or None if they cannot be."""
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  try:
    if slices > 1:
      if shape[0] % slices:
        return None
      return mesh_utils.create_hybrid_device_mesh(
          (shape[0] // slices, shape[1]), (slices, 1), devices,
          allow_split_physical_axes=True)
    return mesh_utils.create_device_mesh(shape, devices,
                                         allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    return None


def check_batch(mesh: Mesh, global_batch: int, grad_accum: int = 1) -> None:
  """Each accumulation micro-batch must split evenly over every device."""
  n = mesh.devices.size
  if global_batch % grad_accum:
    raise UserError(f"global batch {global_batch} is not divisible by "
                    f"grad_accum={grad_accum}")
  micro = global_batch // grad_accum
  if micro % n:
    raise UserError(f"global batch {global_batch} (micro-batch {micro}) is "
                    f"not divisible by the {n} devices of mesh "
                    f"{dict(mesh.shape)}")
  if global_batch % jax.process_count():
    raise UserError(f"global batch {global_batch} is not divisible by the "
                    f"{jax.process_count()} processes")


def _cluster_env() -> bool:
  """Whether the environment describes a multi-process job JAX can join."""
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1 or bool(
      os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def init_distributed(coordinator_address: str | None = None,
                     num_processes: int | None = None,
                     process_id: int | None = None) -> None:
  """Joins a multi-process job; must run before anything touches devices.

  With the three flags it connects explicitly (any platform, CPU included);
  without them it auto-detects TPU pods and Slurm jobs, and otherwise stays a
  single process.
  """
  given = [coordinator_address is not None, num_processes is not None,
           process_id is not None]
  if any(given) and not all(given):
    raise UserError("multi-process runs need all of --coordinator-address, "
                    "--num-processes and --process-id")
  if all(given):
    host, sep, port = coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise UserError(f"bad --coordinator-address {coordinator_address!r}: "
                      "expected HOST:PORT")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise UserError(f"bad --process-id {process_id} for --num-processes "
                      f"{num_processes}")
    if num_processes == 1:
      return
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  elif _cluster_env():
    jax.distributed.initialize()
  else:
    return
  log.info("process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())
