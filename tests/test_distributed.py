"""Multi-process start-up (npp_jax.distributed) and preemption across processes.

Fast: the start-up decision (single host stays uninitialised; explicit flags; a cluster that
JAX's own detection finds: SLURM and GKE through their environment variables, a GCE TPU slice
through a stub metadata server). Slow: two real processes join one distributed system through the
stub metadata server with no flag; SIGTERM to one process of a 2-process training run makes both
save the same step and exit 0, and the rerun resumes it exactly.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

from hypothesis import given, settings, strategies as st
import jax
import numpy as np
import portpicker
import pytest

from gce_metadata import MetadataServer
from npp_jax import checkpoint as ckpt_lib
from npp_jax import distributed, train
from train_helpers import (ROOT, committed_steps, logged_losses, main_command, read_state,
                           run_losses, smoke_config, wait_for)

CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST",
                "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
                "JAX_COORDINATOR_ADDRESS", "GCE_METADATA_IP")


@pytest.fixture
def calls(monkeypatch):
  """A host outside any cluster whose jax.distributed.initialize only records its arguments."""
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  recorded = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
  return recorded


def test_single_host_stays_uninitialised(calls):
  assert distributed.detect_cluster() is None
  assert distributed.initialize() == "single host: no cluster detected"
  assert calls == []


def test_explicit_flags_initialise_with_them(calls):
  how = distributed.initialize(coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3,
                               heartbeat_timeout_seconds=7, initialization_timeout_seconds=9)
  assert "10.0.0.2:1234" in how
  assert calls == [dict(coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3,
                        heartbeat_timeout_seconds=7, initialization_timeout=9)]


_FLAG_VALUES = {"--coordinator_address": "127.0.0.1:5", "--num_processes": 2, "--process_id": 1}


@settings(max_examples=20, deadline=None)
@given(given_flags=st.sets(st.sampled_from(sorted(_FLAG_VALUES)), min_size=1, max_size=2))
def test_incomplete_explicit_flags_name_the_missing_ones(given_flags):
  kwargs = {k[2:]: _FLAG_VALUES[k] for k in given_flags}
  with pytest.raises(ValueError) as err:
    distributed.initialize(**kwargs)
  for flag in _FLAG_VALUES:
    assert (flag in str(err.value).split(" missing")[0]) == (flag not in given_flags)


@pytest.mark.parametrize("kwargs, named", [
    (dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0), "--coordinator_address"),
    (dict(coordinator_address="127.0.0.1:5", num_processes=2, process_id=2), "--process_id=2"),
    (dict(coordinator_address="127.0.0.1:5", num_processes=0, process_id=0), "--process_id=0"),
])
def test_bad_explicit_flags_are_named(kwargs, named, calls):
  with pytest.raises(ValueError, match=re.escape(named)):
    distributed.initialize(**kwargs)
  assert calls == []


@pytest.mark.parametrize("tasks, initialised", [(4, True), (1, False)])
def test_slurm_environment(tasks, initialised, calls, monkeypatch):
  for var, value in {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-4]",
                     "SLURM_NTASKS": str(tasks), "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
    monkeypatch.setenv(var, value)
  assert distributed.detect_cluster() == distributed.Cluster("slurm", tasks)
  distributed.initialize(heartbeat_timeout_seconds=11)
  # JAX's own auto-detection fills in the address and ids: nothing but the timeouts is passed.
  assert calls == ([dict(heartbeat_timeout_seconds=11, initialization_timeout=300)]
                   if initialised else [])


@pytest.fixture
def tpu_vm(monkeypatch):
  """This host as a Cloud TPU VM for JAX's cluster detection (see gce_metadata.py)."""
  from jax._src.clusters import cloud_tpu_cluster, cluster
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  monkeypatch.setattr(cluster, "running_in_cloud_tpu_vm", True)
  monkeypatch.delenv("TPU_SKIP_MDS_QUERY", raising=False)


def test_gke_tpu_slice_from_worker_hostnames(calls, tpu_vm, monkeypatch):
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # GKE: no GCE TPU metadata to ask.
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1,host-2,host-3")
  monkeypatch.setenv("TPU_WORKER_ID", "2")
  monkeypatch.setenv("MEGASCALE_NUM_SLICES", "1")  # else JAX asks the metadata server.
  assert distributed.detect_cluster() == distributed.Cluster("gketpu", 4)
  assert distributed.initialize() == "gketpu cluster of 4 processes"
  assert len(calls) == 1


@pytest.mark.parametrize("ips, initialised", [(["10.0.0.1", "10.0.0.2"], True),
                                              (["10.0.0.1"], False)])
def test_gce_tpu_slice_from_the_metadata_server(ips, initialised, calls, tpu_vm, monkeypatch):
  """No TPU_WORKER_HOSTNAMES (a VM made with gcloud): the slice is found through the metadata
  server; a one-worker TPU VM stays uninitialised."""
  monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the stub is local, whatever proxy is set.
  with MetadataServer(0, ips) as server:
    monkeypatch.setenv("GCE_METADATA_IP", server.address)
    assert distributed.detect_cluster() == distributed.Cluster("gcetpu", len(ips))
    distributed.initialize()
  assert "agent-worker-number" in server.requests
  assert len(calls) == int(initialised)


def test_preemption_handler_needs_the_sync_service_with_several_processes(monkeypatch):
  """Several processes: SIGTERM belongs to JAX's preemption sync manager; without it (the service
  turned off) a pod would die unsaved, so start-up refuses naming the setting."""
  from jax._src import distributed as jax_distributed
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax_distributed.global_state, "preemption_sync_manager", None)
  with pytest.raises(RuntimeError, match="jax_enable_preemption_service"):
    ckpt_lib.install_preemption_handler()
  monkeypatch.setattr(jax_distributed.global_state, "preemption_sync_manager", object())
  ckpt_lib.install_preemption_handler()  # the manager owns SIGTERM: nothing to install here.
  handler = ckpt_lib._SIGTERM._handler  # pylint: disable=protected-access
  assert signal.getsignal(signal.SIGTERM) != handler


# ---------------------------------------------------------------------------------------------
# Real processes.
# ---------------------------------------------------------------------------------------------
SHIM = os.path.join(ROOT, "tests", "gce_metadata.py")


def tpu_worker_env(server, coordinator_port, devices):
  """The environment of a process on one worker of a stub TPU slice: CPU devices, the worker's
  metadata server, JAX's coordinator port; no distributed flag or variable."""
  env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             GCE_METADATA_IP=server.address, JAX_COORDINATOR_PORT=str(coordinator_port),
             NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
  return env


class _Slice:
  """The two workers of a stub TPU slice (a metadata server each, one coordinator port)."""

  def __init__(self):
    self.port = portpicker.pick_unused_port()
    self.servers = [MetadataServer(i, ["127.0.0.1", "127.0.0.1"]) for i in range(2)]

  def __enter__(self):
    for s in self.servers:
      s.__enter__()
    return self

  def __exit__(self, *exc):
    for s in self.servers:
      s.__exit__(*exc)

  def start_main(self, workdir, shards, tmp_path, name, overrides):
    """`python -m npp_jax.main` on both workers with no distributed flag; (Popens, log paths)."""
    procs, logs = [], []
    for i, server in enumerate(self.servers):
      logs.append(tmp_path / f"{name}{i}.log")
      cmd = main_command(workdir, shards, overrides=overrides)
      with open(logs[-1], "w") as log:
        procs.append(subprocess.Popen([sys.executable, SHIM, *cmd[1:]], cwd=ROOT,
                                      env=tpu_worker_env(server, self.port, 4), stdout=log,
                                      stderr=subprocess.STDOUT))
    return procs, logs


_PROBE = """
import jax, numpy as np
from jax.experimental import multihost_utils
from npp_jax import distributed
distributed.initialize()
seen = multihost_utils.process_allgather(np.array([jax.process_index()]))
print(f"PROBE index={jax.process_index()} count={jax.process_count()} "
      f"devices={jax.device_count()} seen={sorted(np.ravel(seen).tolist())}")
"""


@pytest.mark.slow
def test_two_tpu_workers_join_without_flags():
  """Two processes, each with its worker's stub metadata server (worker 0 and 1 of a 2-worker
  slice on 127.0.0.1), join one distributed system with no flag: both see 2 processes, their own
  index, 4 global devices, and each other in a collective."""
  with _Slice() as tpu:
    procs = [subprocess.Popen([sys.executable, SHIM, "-c", _PROBE], cwd=ROOT,
                              env=tpu_worker_env(server, tpu.port, 2), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for server in tpu.servers]
    outs = [p.communicate(timeout=120)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out[-3000:]
    assert f"PROBE index={i} count=2 devices=4 seen=[0, 1]" in out, out[-3000:]




_SLEEPER = """
import sys, time
from npp_jax import distributed
distributed.initialize(sigterm_stops=sys.argv[1] == "stops", heartbeat_timeout_seconds=5)
print("JOINED", flush=True)
time.sleep(30)
print("SLEPT", flush=True)
"""


@pytest.mark.slow
def test_sigterm_ends_a_cli_that_does_not_poll_for_preemption():
  """JAX's preemption sync manager takes SIGTERM and only records it; the sampler and the
  tokeniser (sigterm_stops=True) get its default action back, so a preemption or stop.sh ends them
  at once instead of after stop.sh's grace period. The trainer's side: the test below."""
  with _Slice() as tpu:
    procs = [subprocess.Popen([sys.executable, SHIM, "-c", _SLEEPER, mode], cwd=ROOT,
                              env=tpu_worker_env(server, tpu.port, 1), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
             for server, mode in zip(tpu.servers, ("records", "stops"))]
    try:
      for p in procs:
        assert p.stdout.readline() == "JOINED\n"
      procs[0].send_signal(signal.SIGTERM)  # recorded for the preemption sync, not fatal
      time.sleep(1)
      assert procs[0].poll() is None
      procs[1].send_signal(signal.SIGTERM)
      assert procs[1].wait(timeout=10) == -signal.SIGTERM
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
        p.communicate()

@pytest.mark.slow
def test_sigterm_to_one_process_saves_both_at_the_same_step(shards, tmp_path):
  """A 2-process training run started with no flag on a stub 2-worker TPU slice: SIGTERM to
  process 1 only makes both processes save the same step (JAX's preemption sync service) and exit
  0; rerunning the same command resumes it and ends where an uninterrupted run ends."""
  overrides = {"data.eval_split": "", "ckpt.every_steps": 100}
  train.train_and_evaluate(smoke_config(shards, **overrides), str(tmp_path / "ref"))
  ref_losses = run_losses(tmp_path / "ref")
  workdir = tmp_path / "w"
  checkpoints = workdir / "checkpoints"
  with _Slice() as tpu:
    procs, logs = tpu.start_main(workdir, shards, tmp_path, "first", overrides)
    try:
      assert wait_for(lambda: logged_losses(logs[0].read_text()), 300, 0.02, procs[0]), (
          logs[0].read_text()[-3000:])
      procs[1].send_signal(signal.SIGTERM)
      rcs = [p.wait(timeout=120) for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    texts = [log.read_text() for log in logs]
    assert rcs == [0, 0], [t[-3000:] for t in texts]
    for i, text in enumerate(texts):
      assert "gcetpu cluster of 2 processes" in text and f"JAX process {i} of 2;" in text
    stops = [int(re.search(r"Preemption notice at step (\d+): saved", t).group(1)) for t in texts]
    assert stops[0] == stops[1] < 12, stops
    stopped = stops[0]
    assert f"Preempted at step {stopped} " in texts[0]
    assert committed_steps(checkpoints)[-1] == stopped
    assert sorted(p.name for p in (checkpoints / str(stopped) / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert not (workdir / "finished.json").exists()

    procs, logs = tpu.start_main(workdir, shards, tmp_path, "second", overrides)
    rcs = [p.wait(timeout=600) for p in procs]
    second = [log.read_text() for log in logs]
    assert rcs == [0, 0], [t[-3000:] for t in second]
  assert f"Step {stopped}: resumed from {checkpoints / str(stopped)}" in second[0]
  assert json.loads((workdir / "finished.json").read_text())["step"] == 12
  logged = {**logged_losses(texts[0]), **logged_losses(second[0])}
  assert sorted(logged) == list(range(12))
  # 2 x 4 devices vs 1 x 8: the same batches and math, reduced in another order (measured: the
  # final arrays differ by <= 5e-7; every logged loss agrees to its 6 printed digits).
  for step, loss in logged.items():
    assert loss == pytest.approx(ref_losses[step], rel=1e-4), step
  final = read_state(checkpoints / "12")
  expected = read_state(tmp_path / "ref" / "checkpoints" / "12")
  assert sorted(final) == sorted(expected)
  for k in final:
    np.testing.assert_allclose(final[k], expected[k], rtol=1e-4, atol=1e-6, err_msg=k)
