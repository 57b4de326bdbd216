"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs are shared between tests and the subprocesses they start (same HLO, same
# executable): the suite compiles each distinct step once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from absl import flags  # noqa: E402

# grain's worker processes read absl flags; tests do not go through app.run.
flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """Synthetic token shards of the smoke config (see train_helpers.write_shards), one per module."""
  from train_helpers import write_shards  # pylint: disable=g-import-not-at-top  (imports npp_jax)
  return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def gpt():
  """The tiny reference GPT (tests/fixtures): state dict, reference I/O, converted params."""
  from torch_files import gpt_fixture  # pylint: disable=g-import-not-at-top  (imports npp_jax)
  return gpt_fixture()


@pytest.fixture(scope="module")
def vq_fx():
  """The small reference VQ (tests/fixtures): state dict and reference I/O."""
  from torch_files import load_npz  # pylint: disable=g-import-not-at-top  (imports npp_jax)
  return load_npz("llamagen_vq_small.npz")
