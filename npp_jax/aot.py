"""Ahead-of-time compilation for TPU topologies on any host (placeholder, filled in below)."""
from __future__ import annotations

import os


def topology_devices(topology: str) -> list:
  """The TPU devices of a topology descriptor (e.g. "v5p:2x4x4"), without a TPU: libtpu's
  compiler describes them. Several processes may load libtpu for this (nothing runs on a TPU)."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
