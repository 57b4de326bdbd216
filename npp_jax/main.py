"""Entry point: `python -m npp_jax.main --config=configs/npp_xl.py --workdir=gs://BUCKET/run`.

Run the same command on every worker of a TPU pod slice (launch/ does that). Flags:
  --config        an ml_collections config file; override keys with --config.optim.lr=3e-4.
  --workdir       local path or gs://; checkpoints, TensorBoard events and config.json go there.
  --max_steps     stop after N steps of this run (e.g. 1 for a dry run that builds, shards and
                  compiles the step of the first patch level and trains one step).
  --coordinator_address / --num_processes / --process_id
                  explicit multi-process set-up (CPU or GPU clusters, tests). On Cloud TPU pods
                  jax.distributed is initialised automatically when these are not given.
  --heartbeat_timeout_seconds
                  how long a dead peer process goes unnoticed before every survivor stops with
                  an error (instead of hanging in a collective).
"""
from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from npp_jax import logs  # imports no JAX: JAX is imported after absl parsed the flags.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go (local or gs://).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Stop after this many steps of this run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of JAX processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", 100, "Multi-process: a peer silent this long is taken as dead "
    "and every process stops with an error.", lower_bound=1)
_LIBRARY_LOGS = flags.DEFINE_bool("library_logs", False, "Show orbax/grain INFO logs.")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume even though the config changes what the run computes "
    "(model, schedule, optimizer, batch size, seed, splits); by default such a resume is refused.")
flags.mark_flags_as_required(["config", "workdir"])


def _on_tpu_pod() -> bool:
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _LIBRARY_LOGS.value:
    logs.quiet_library_logs()
  import jax  # after absl parsed the flags, so JAX's own flags see the environment.

  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                               heartbeat_timeout_seconds=_HEARTBEAT.value)
  elif _on_tpu_pod():
    jax.distributed.initialize(heartbeat_timeout_seconds=_HEARTBEAT.value)
  from npp_jax import checkpoint, train  # noqa: E402  (jax-dependent modules after initialisation)

  checkpoint.install_preemption_handler()  # SIGTERM: save at the next step, then exit cleanly.

  logging.info("JAX process %d of %d; %d local / %d global devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, max_steps=_MAX_STEPS.value,
                                     allow_config_change=_ALLOW_CHANGE.value)
  if jax.process_index() == 0 and summary.get("preempted"):
    print(f"Preempted at step {summary['step']} (train loss {summary['train_loss']}): saved; run "
          f"the same command again to resume.\n  checkpoints: {summary['workdir']}/checkpoints")
  elif jax.process_index() == 0:
    print(f"Training finished at step {summary['step']} "
          f"(train loss {summary['train_loss']}, eval loss {summary.get('eval_loss')}).")
    for line in summary.get("report", ()):  # from the hooks (e.g. a built-in data set's report).
      print(f"  {line}")
    print(f"  training cost relative to next-token prediction: {summary['training_cost']:.3f}\n"
          f"  checkpoints: {summary['workdir']}/checkpoints\n"
          f"  TensorBoard: tensorboard --logdir {summary['workdir']}")


if __name__ == "__main__":
  app.run(main)
