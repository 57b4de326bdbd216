"""Accelerator facts in one table: per-chip HBM, bf16 peak, HBM and interconnect bandwidth, and the
accelerator-type names users type into gcloud (`v5p-64`, `v5litepod-16`, ...) mapped to the
topology descriptors of `jax.experimental.topologies`.

Used by the ahead-of-time compile tool (`npp_jax.aot`) for its roofline estimate and by training
for MFU. Figures are Google's (and NVIDIA's) public per-chip spec sheets; the interconnect figure
is the chip's total ICI bandwidth (all links), so collective-time estimates built on it are lower
bounds. Check them against the current documentation before relying on them.
"""
from __future__ import annotations

import dataclasses
import math
import re

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # our short name: v4, v5e, v5p, v6e, ...
  device_kinds: tuple[str, ...]  # jax `Device.device_kind` strings of this chip.
  hbm_bytes: int  # per chip.
  peak_bf16_flops: float  # per chip, dense.
  hbm_bytes_per_s: float
  ici_bytes_per_s: float  # total interconnect bandwidth per chip (0: not applicable).
  cores_per_chip: int = 1  # TensorCores per chip that gcloud's accelerator-type number counts.
  topology_dims: int = 2  # 3 for the twisted-torus chips (v4, v5p).


CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", ("TPU v4",), 32 * GiB, 275e12, 1.2e12, 300e9, cores_per_chip=2, topology_dims=3),
    Chip("v5e", ("TPU v5 lite", "TPU v5e"), 16 * GiB, 197e12, 0.819e12, 200e9),
    Chip("v5p", ("TPU v5", "TPU v5p"), 95 * GiB, 459e12, 2.765e12, 600e9, cores_per_chip=2,
         topology_dims=3),
    Chip("v6e", ("TPU v6 lite", "TPU v6e"), 32 * GiB, 918e12, 1.64e12, 448e9),
    # GPUs, for MFU on a GPU run (no topology names: `aot` compiles for TPU only).
    Chip("h100", ("NVIDIA H100 80GB HBM3", "NVIDIA H100"), 80 * GiB, 989e12, 3.35e12, 450e9),
    Chip("h200", ("NVIDIA H200",), 141 * GiB, 989e12, 4.8e12, 450e9),
)}

# gcloud accelerator-type prefixes -> chip.
_PREFIXES = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A pod slice: `name` as gcloud spells it, its chip, chip count and topology descriptor."""
  name: str
  chip: Chip
  num_chips: int
  topology: str  # for topologies.get_topology_desc, e.g. "v5p:2x4x4".


def _factor(num_chips: int, dims: int) -> tuple[int, ...]:
  """The slice shape Cloud TPU uses for `num_chips`: 3-D slices start at 2x2x1, then the
  smallest dimension doubles (the last of equals first): 2x2x2, 2x2x4, 2x4x4, 4x4x4; 2-D slices
  likewise from 1x1: 2x2, 2x4, 4x4, 4x8."""
  if num_chips < 1 or num_chips & (num_chips - 1) or (dims == 3 and num_chips < 4):
    raise ValueError(f"{num_chips} chips is not a slice size (a power of two"
                     f"{', at least 4' if dims == 3 else ''}).")
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  while math.prod(shape) < num_chips:
    i = max(range(dims), key=lambda k: (-shape[k], k))
    shape[i] *= 2
  return tuple(shape)


def accelerator(name: str) -> Accelerator:
  """Parses `v4-32`, `v5p-64`, `v5litepod-16`, `v6e-8` (or a topology such as `v5p:2x2x1`)."""
  m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name.strip())
  if m:
    chip = CHIPS[_PREFIXES[m.group(1)]]
    count = int(m.group(2))
    if count % chip.cores_per_chip:
      raise ValueError(f"topology {name!r}: {m.group(1)}-N counts TensorCores "
                       f"({chip.cores_per_chip} per chip); N must be a multiple of that.")
    chips = count // chip.cores_per_chip
    try:
      shape = _factor(chips, chip.topology_dims)
    except ValueError as e:
      raise ValueError(f"topology {name!r}: {e}") from None
    prefix = "v5e" if chip.name == "v5e" else chip.name
    return Accelerator(name, chip, chips, f"{prefix}:{'x'.join(map(str, shape))}")
  m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", name.strip())
  if m:
    chip = CHIPS[m.group(1)]
    dims = [int(d) for d in m.group(2).split("x")]
    if len(dims) != chip.topology_dims:
      raise ValueError(f"topology {name!r}: {chip.name} slices have {chip.topology_dims} "
                       f"dimensions.")
    return Accelerator(name, chip, math.prod(dims), name.strip())
  known = ", ".join(f"{p}-N" for p in _PREFIXES) + " or CHIP:AxB[xC]"
  raise ValueError(f"topology {name!r} is unknown; use a Cloud TPU accelerator type ({known}), "
                   f"e.g. v5p-64, v5litepod-16, v6e-8, v4-32.")


def chip_of(device_kind: str) -> Chip | None:
  """The chip of a jax device's `device_kind`, or None (CPU, unknown accelerators)."""
  for chip in CHIPS.values():
    if any(device_kind == k or device_kind.startswith(k + " ") for k in chip.device_kinds):
      return chip
  return None


def peak_flops(device_kind: str) -> float | None:
  """bf16 dense peak FLOP/s of one device of this kind, or None where unknown (CPU)."""
  chip = chip_of(device_kind)
  return chip.peak_bf16_flops if chip else None
