"""The CLIs' library-log filter: orbax/grain INFO dropped, their warnings and other logs kept."""
import logging
import os

import pytest
from absl import logging as absl_logging

from npp_jax import logs


def _record(path: str, level: int) -> logging.LogRecord:
  return logging.LogRecord("x", level, path, 1, "message", None, None)


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR])
@pytest.mark.parametrize("lib", ["orbax", "grain", "flax", "npp_jax"])
def test_filter_drops_only_noisy_library_info(lib, level):
  path = os.path.join(os.sep, "venv", "site-packages", lib, "checkpoint", "module.py")
  kept = logs.QuietLibraries().filter(_record(path, level))
  assert kept == (level >= logging.WARNING or lib not in logs.NOISY_LIBRARIES)


def test_a_name_that_only_contains_a_library_is_kept():
  path = os.path.join(os.sep, "src", "my_orbax_tools", "x.py")
  assert logs.QuietLibraries().filter(_record(path, logging.INFO))


def test_installed_once_on_the_absl_handler():
  handler = absl_logging.get_absl_handler()
  before = [f for f in handler.filters if isinstance(f, logs.QuietLibraries)]
  try:
    first = logs.quiet_library_logs()
    assert logs.quiet_library_logs() is first
    assert sum(isinstance(f, logs.QuietLibraries) for f in handler.filters) == 1
  finally:
    for f in handler.filters[:]:
      if isinstance(f, logs.QuietLibraries) and f not in before:
        handler.removeFilter(f)


def test_dropped_silences_only_its_prefixes_and_only_while_active(caplog):
  log = logging.getLogger("absl")
  with caplog.at_level(logging.WARNING, logger="absl"):
    with logs.dropped("Metadata file does not exist", "Given directory"):
      log.warning("Metadata file does not exist: %s", "/ckpt/3/state/_CHECKPOINT_METADATA")
      log.warning("Given directory is read only=%s", "/ckpt")
      log.warning("Something else at %s", "/ckpt")
    log.warning("Metadata file does not exist: %s", "/ckpt/4/state/_CHECKPOINT_METADATA")
  assert [r.getMessage() for r in caplog.records] == [
      "Something else at /ckpt", "Metadata file does not exist: /ckpt/4/state/_CHECKPOINT_METADATA"]
