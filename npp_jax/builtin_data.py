"""Built-in data sets: ones the trainer builds itself into the workdir (`config.data.builtin`).

A built-in data set NAME is the module `npp_jax.NAME` defining `BUILTIN`, a `BuiltinData`: how to
write its token shards, how to turn its codes into images (sample grids without a VQ), and the
hooks it adds to the training loop (e.g. the CPU demo's report, `npp_jax/digits.py`). The core
modules (train, sample, config_lib) reach a demo only through `lookup`, never by its name.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable

from etils import epath
import numpy as np


@dataclasses.dataclass(frozen=True)
class BuiltinData:
  build: Callable[[epath.Path], epath.Path]  # writes its shards into a dir (idempotent).
  decode: Callable[[np.ndarray], np.ndarray]  # codes_BxN -> uint8 images_BxHxWx3.
  hooks: Callable[[Any], list]  # (hooks.Run) -> the extra hooks of the training loop.


def lookup(name: str) -> BuiltinData:
  """The built-in data set `name`; a ValueError naming config.data.builtin when there is none."""
  module = None
  if re.fullmatch(r"[a-z][a-z0-9_]*", name):
    try:
      module = importlib.import_module(f"npp_jax.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"npp_jax.{name}":
        raise
  builtin = getattr(module, "BUILTIN", None)
  if not isinstance(builtin, BuiltinData):
    raise ValueError(f"config.data.builtin={name!r} must be '' or a built-in data set: a module "
                     f"npp_jax.NAME that defines BUILTIN (a builtin_data.BuiltinData).")
  return builtin
