"""What a device can do: published peak FLOP/s and a measured matmul rate.

The benchmarks and the trainer divide their achieved FLOP/s by these: the
table gives model FLOPs utilisation (MFU) on known accelerators, the matmul
rate a same-process reference where no peak is published (e.g. CPUs).
"""

from __future__ import annotations

import glob
import time

# Dense bfloat16 peak FLOP/s of one TPU chip by generation (Cloud's names).
# TPUs run float32 matmuls as bfloat16 passes at default precision, so the
# same peak serves both.
TPU_PEAK_BF16 = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
# device_kind -> generation; the first fragment found wins ("TPU v5" alone is
# a v5p, whose kind has no suffix; a v5e says "TPU v5 lite").
_TPU_KINDS = (("TPU v6", "v6e"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"),
              ("TPU v5", "v5p"), ("TPU v4", "v4"))
# Dense peak FLOP/s of GPUs: (device_kind fragment, {dtype: peak}); float32
# means TF32 tensor cores (XLA's default precision).
_GPU_PEAKS = (
    ("H200", {"bfloat16": 989e12, "float32": 494.5e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494.5e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
)


def device_peak(device, dtype: str) -> float | None:
  """Peak FLOP/s of one device from the table; None if unknown (e.g. CPU)."""
  kind = getattr(device, "device_kind", "").lower()
  for frag, peaks in _GPU_PEAKS:
    if frag.lower() in kind:
      return peaks.get(dtype)
  for frag, generation in _TPU_KINDS:
    if frag.lower() in kind:
      return (TPU_PEAK_BF16[generation]
              if dtype in ("bfloat16", "float32") else None)
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
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
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
