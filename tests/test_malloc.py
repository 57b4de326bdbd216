"""npp_jax.malloc: the CPU-host decision and the glibc setting that keeps freed pages mapped."""
import os
import subprocess
import sys
import textwrap

import pytest

from npp_jax import malloc

# Allocates, touches and frees a 64 MB buffer 10 times; prints the page faults of the last 9 and
# the MB that the process's resident set shrinks by when one more such buffer is freed.
_FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from npp_jax import malloc
    if sys.argv[1] == "tuned":
      assert malloc.tune_malloc()
    def faults():
      return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def rss():
      return int(open("/proc/self/statm").read().split()[1]) * 4096
    np.ones(1 << 23)  # 64 MB, warm-up
    before = faults()
    for _ in range(9):
      np.ones(1 << 23)
    buffer = np.ones(1 << 23)
    held = rss()
    del buffer
    print(faults() - before, (held - rss()) >> 20)
""")


@pytest.mark.parametrize("platforms,expected", [("cpu", True), ("CPU", True), ("tpu", False),
                                                ("cpu,tpu", False), ("cuda", False)])
def test_jax_platforms_decides(monkeypatch, platforms, expected):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert malloc.cpu_only() is expected


@pytest.mark.parametrize("nodes,expected", [(["null", "tty0"], True), (["accel0"], False),
                                            (["vfio"], False), (["nvidia0", "nvidiactl"], False)])
def test_accelerator_device_nodes_decide(monkeypatch, nodes, expected):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(malloc.os, "listdir", lambda path: nodes)
  assert malloc.cpu_only() is expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tuned_malloc_reuses_freed_pages():
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  faults, returned = {}, {}
  for mode in ("default", "tuned"):
    proc = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    faults[mode], returned[mode] = map(int, proc.stdout.split())
  assert faults["default"] > 100 and returned["default"] >= 60  # each buffer a fresh mmap
  assert faults["tuned"] <= faults["default"] // 10 and returned["tuned"] < 8  # pages reused
