"""What a device can do: published peak FLOP/s and a measured matmul rate.

The benchmarks and the trainer divide their achieved FLOP/s by these: the
table gives model FLOPs utilisation (MFU) on known accelerators, the matmul
rate a same-process reference where no peak is published (e.g. CPUs).
"""

from __future__ import annotations

import glob
import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per device: (device_kind fragment, {dtype: peak}). float32
# on GPUs means TF32 tensor cores (XLA's default precision); TPUs run float32
# matmuls as bfloat16 passes at default precision.
_PEAKS = (
    ("H200", {"bfloat16": 989e12, "float32": 494.5e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494.5e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("TPU v6", {"bfloat16": 918e12, "float32": 918e12}),
    ("TPU v5p", {"bfloat16": 459e12, "float32": 459e12}),
    ("TPU v5", {"bfloat16": 197e12, "float32": 197e12}),  # v5e / "v5 lite"
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
)


def device_peak(device, dtype: str) -> float | None:
  """Peak FLOP/s of one device from the table; None if unknown (e.g. CPU)."""
  kind = getattr(device, "device_kind", "")
  for frag, peaks in _PEAKS:
    if frag.lower() in kind.lower():
      return peaks.get(dtype)
  return None


_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips attach as PCI devices of Google's.


def tpu_attached() -> bool:
  """Whether this machine has TPU chips (PCI devices by Google), read from
  sysfs without starting any runtime."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor, encoding="ascii") as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def measure_matmul_peak(dtype: str = "float32", n: int = 2048,
                        iters: int = 10) -> float:
  """Achieved FLOP/s of a square matmul chain on the default device."""
  dt = jnp.dtype(dtype)
  a = jax.random.normal(jax.random.key(0), (n, n), dt)

  @jax.jit
  def chain(x):
    def body(_, y):  # Keeps values bounded so every iteration is real work.
      return jnp.tanh(y @ a).astype(dt)
    return jax.lax.fori_loop(0, iters, body, x)

  chain(a).block_until_ready()
  t0 = time.perf_counter()
  chain(a).block_until_ready()
  return 2.0 * n ** 3 * iters / (time.perf_counter() - t0)
