"""glibc malloc settings for XLA:CPU processes: one place, used by every CLI that computes on CPU.

Owns `tune_malloc`: the training entry point (`npp_jax.main`), the NPP-vs-NTP experiment and the
benchmark (`npp_jax.bench`) call it at start-up when they compute on the CPU. Imports nothing
heavy: the callers run it before JAX creates its CPU client.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# The same settings as an environment variable (for a process started by someone else).
GLIBC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                  "glibc.malloc.trim_threshold=2147483647")


def tune_malloc() -> bool:
  """Makes glibc malloc reuse freed memory instead of returning it to the OS; True if applied.

  XLA:CPU allocates each step's temporaries (hundreds of MB) afresh; with glibc's defaults every
  large buffer is a new mmap whose pages fault in (and are zeroed by the kernel) on first touch,
  every step (README, "The CPU demo", has the measured system time). One arena, no mmap and no
  trimming keep the pages mapped across steps (the same as GLIBC_TUNABLES above). The process
  keeps its peak memory. Call it before JAX creates its CPU client (i.e. before the first
  `jax.devices()` or computation): threads that already own an arena keep it.
  """
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc
    return False
  return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
              mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)])


def cpu_only() -> bool:
  """Whether JAX will compute on the CPU only, decided without starting JAX: JAX_PLATFORMS says
  cpu, or no accelerator device node exists (TPU: /dev/accel*, /dev/vfio; GPU: /dev/nvidia*,
  /dev/kfd)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return set(platforms.split(",")) == {"cpu"}
  try:
    names = os.listdir("/dev")
  except OSError:
    return False
  return not any(n.startswith(("accel", "nvidia")) or n in ("vfio", "kfd") for n in names)
