"""Multi-process start-up shared by every CLI (train, sample, extract).

Owns the `--coordinator_address / --num_processes / --process_id / --heartbeat_timeout_seconds /
--initialization_timeout_seconds` flags and `initialize_from_flags()`, which decides whether this
process joins a `jax.distributed` system:

  * explicit flags (CPU or GPU clusters, tests): initialise with them;
  * otherwise ask JAX's own cluster detection (`jax._src.clusters`: a Cloud TPU VM slice found
    through the GCE metadata server, GKE via `TPU_WORKER_HOSTNAMES`, SLURM, Open MPI, Kubernetes)
    whether a cluster of more than one process is present, and if so let
    `jax.distributed.initialize()` detect the rest exactly as it does on its own;
  * a single host (no cluster, or a one-worker TPU VM) stays uninitialised.

Initialising also starts JAX's preemption sync service (every process agrees on the step at which
to save after a SIGTERM; see checkpoint.install_preemption_handler) and the heartbeat that stops
every survivor when a peer dies. JAX is imported inside the functions: the CLIs import this module
before absl has parsed their flags, and JAX must be imported after that.
"""
from __future__ import annotations

import dataclasses
import signal

from absl import flags, logging

_FLAGS = ("coordinator_address", "num_processes", "process_id", "heartbeat_timeout_seconds",
          "initialization_timeout_seconds")


def define_flags() -> None:
  """Defines the start-up flags (call once, from a CLI's flag definitions)."""
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 (CPU/GPU clusters, tests); with --num_processes and "
                      "--process_id. On Cloud TPU slices, GKE, SLURM or Open MPI JAX finds these "
                      "by itself.")
  flags.DEFINE_integer("num_processes", None,
                       "Number of JAX processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "Index of this process (with --coordinator_address).")
  flags.DEFINE_integer("heartbeat_timeout_seconds", 100,
                       "Multi-process: a peer silent this long is taken as dead and every process "
                       "stops with an error.", lower_bound=1)
  flags.DEFINE_integer("initialization_timeout_seconds", 300,
                       "Multi-process: how long to wait for every process to join.", lower_bound=1)


@dataclasses.dataclass(frozen=True)
class Cluster:
  """A cluster JAX's auto-detection recognises: its ClusterEnv name and its process count."""
  name: str
  process_count: int


def detect_cluster() -> Cluster | None:
  """The cluster `jax.distributed.initialize()` would detect, without initialising anything.

  Uses JAX's ClusterEnv registry (private: jax._src.clusters, the machinery initialize() itself
  consults) and the same choice as `ClusterEnv.auto_detect_unset_distributed_params`: the first
  registered environment that is not opt-in and reports itself present. On a Cloud TPU VM the GCE
  TPU environment asks the metadata server (`GCE_METADATA_IP` points it elsewhere) for
  `agent-worker-number` and `worker-network-endpoints`.
  """
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if not env.opt_in_only_method and env.is_env_present():
      return Cluster(env.name, int(env.get_process_count()))
  return None


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_seconds: int = 100,
               initialization_timeout_seconds: int = 300, sigterm_stops: bool = False) -> str:
  """Joins the distributed system this process belongs to, if any; returns how it decided.

  Initialising hands SIGTERM to JAX's preemption sync manager, which only records it: the
  trainer polls it and saves (checkpoint.install_preemption_handler). `sigterm_stops=True` (CLIs
  that never poll it: sampling and tokenising resume from what they wrote) gives SIGTERM back its
  default action, so a preemption or launch/stop.sh ends them at once.

  Raises ValueError naming the flag when the explicit flags are incomplete or inconsistent.
  """
  how = _join(coordinator_address, num_processes, process_id, heartbeat_timeout_seconds,
              initialization_timeout_seconds)
  if sigterm_stops:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  return how


def _join(coordinator_address, num_processes, process_id, heartbeat_timeout_seconds,
          initialization_timeout_seconds) -> str:
  import jax  # pylint: disable=g-import-not-at-top

  timeouts = dict(heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                  initialization_timeout=initialization_timeout_seconds)
  if jax.distributed.is_initialized():
    return "already initialised"
  if coordinator_address is not None or num_processes is not None or process_id is not None:
    _check_explicit(coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id, **timeouts)
    return f"--coordinator_address={coordinator_address}"
  cluster = detect_cluster()
  if cluster is None:
    return "single host: no cluster detected"
  if cluster.process_count <= 1:
    return f"single host: {cluster.name} cluster of one process"
  jax.distributed.initialize(**timeouts)
  return f"{cluster.name} cluster of {cluster.process_count} processes"


def _check_explicit(coordinator_address, num_processes, process_id) -> None:
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ValueError(f"{', '.join(missing)} missing: explicit multi-process start-up needs "
                     f"--coordinator_address, --num_processes and --process_id together (on a "
                     f"Cloud TPU slice, GKE, SLURM or Open MPI pass none of them).")
  if ":" not in coordinator_address:
    raise ValueError(f"--coordinator_address={coordinator_address} is not host:port.")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} is not in [0, --num_processes={num_processes}).")


def initialize_from_flags(*, sigterm_stops: bool = False) -> str:
  """`initialize` with the values of the flags `define_flags` defined; logs the outcome."""
  values = {name: flags.FLAGS[name].value for name in _FLAGS}
  how = initialize(sigterm_stops=sigterm_stops, **values)
  import jax  # pylint: disable=g-import-not-at-top
  logging.info("Start-up: %s. JAX process %d of %d; %d local / %d global devices (%s).", how,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  return how
