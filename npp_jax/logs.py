"""Log hygiene shared by the CLIs: orbax and grain log dozens of INFO lines per checkpoint.

Owns `quiet_library_logs`, which both `python -m npp_jax.main` and `python -m npp_jax.sample`
install on absl's handler (unless `--library_logs`), and `dropped`, which silences specific
warnings known to be harmless around the calls that cause them. Imports nothing heavy: `main`
installs the filter before importing JAX.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

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


class _DropPrefixes(logging.Filter):

  def __init__(self, prefixes: tuple[str, ...]):
    super().__init__()
    self._prefixes = prefixes

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._prefixes)


@contextlib.contextmanager
def dropped(*prefixes: str, logger: str = "absl") -> Iterator[None]:
  """Drops records of `logger` whose message starts with one of `prefixes` while active."""
  f = _DropPrefixes(prefixes)
  target = logging.getLogger(logger)
  target.addFilter(f)
  try:
    yield
  finally:
    target.removeFilter(f)
