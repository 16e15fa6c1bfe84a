"""The host process: glibc's allocator set to reuse XLA:CPU's large per-step buffers."""

import ctypes
import importlib.metadata
import importlib.util
import sys

import jax

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_SETTINGS = (
    (_M_MMAP_MAX, 0),  # never mmap: big blocks come from the heap...
    (_M_ARENA_MAX, 1),  # ...one heap, whichever thread allocates...
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # ...which keeps what is freed...
    (_M_TOP_PAD, 512 * 2**20),  # ...and grows in large steps.
)


def cpu_only() -> bool:
  """Whether JAX will run on the CPU alone: no other platform asked for, no accelerator plugin installed.

  Answered without starting a backend.
  """
  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(",") == ["cpu"]
  plugins = importlib.metadata.entry_points(group="jax_plugins")
  return not plugins and not any(
      importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu")
  )


def reuse_freed_memory() -> bool:
  """For a CPU-only run, makes glibc keep freed memory for reuse rather than unmap it.

  XLA:CPU allocates each step's large buffers afresh, and glibc serves
  allocations over 32 MiB with mmap and unmaps them when freed, so every step
  page-faults its big buffers in again: an elementwise op on 32 MiB took 11 ms
  instead of 0.5 ms, and the student's train step lost about a third of its
  time so (BENCHMARKS.md). The process keeps its peak heap instead, as a
  training process would anyway. One heap for all threads would slow a host
  that feeds an accelerator from many threads, hence CPU-only runs alone.

  Must run before JAX starts its backend (threads keep the heaps they began
  with). Returns whether the settings applied (CPU-only on glibc Linux).
  """
  if not sys.platform.startswith("linux") or not cpu_only():
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl)
    return False
  return all(mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)
