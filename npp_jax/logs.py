"""Log hygiene shared by the CLIs: orbax and grain log dozens of INFO lines per checkpoint.

Owns `quiet_library_logs`, which both `python -m npp_jax.main` and `python -m npp_jax.sample`
install on absl's handler (unless `--library_logs`). Imports nothing heavy: `main` installs it
before importing JAX.
"""
from __future__ import annotations

import logging
import os

from absl import logging as absl_logging

NOISY_LIBRARIES = ("orbax", "grain")


class QuietLibraries(logging.Filter):
  """Drops records below WARNING whose source file lies in one of `libraries`' packages."""

  def __init__(self, libraries: tuple[str, ...] = NOISY_LIBRARIES):
    super().__init__()
    self._parts = tuple(f"{os.sep}{lib}{os.sep}" for lib in libraries)

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(p in record.pathname for p in self._parts)


def quiet_library_logs(libraries: tuple[str, ...] = NOISY_LIBRARIES) -> QuietLibraries:
  """Installs a `QuietLibraries` filter on absl's handler (once) and returns it."""
  handler = absl_logging.get_absl_handler()
  for f in handler.filters:
    if isinstance(f, QuietLibraries):
      return f
  f = QuietLibraries(libraries)
  handler.addFilter(f)
  return f
