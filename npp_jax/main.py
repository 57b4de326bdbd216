"""Entry point: `python -m npp_jax.main --config=configs/npp_xl.py --workdir=gs://BUCKET/run`.

Run the same command on every worker of a TPU pod slice (launch/ does that). Flags:
  --config        an ml_collections config file; override keys with --config.optim.lr=3e-4.
  --workdir       local path or gs://; checkpoints, TensorBoard events and config.json go there.
  --max_steps     stop after N steps of this run (e.g. 1 for a dry run that builds, shards and
                  compiles the step of the first patch level and trains one step).
  --tune_malloc   on a CPU-only host, keep freed memory in glibc malloc (npp_jax.malloc; on by
                  default: without it XLA:CPU's step buffers fault their pages in every step).
  --coordinator_address / --num_processes / --process_id / --heartbeat_timeout_seconds /
  --initialization_timeout_seconds
                  multi-process start-up (npp_jax.distributed): explicit for CPU or GPU
                  clusters and tests; on Cloud TPU slices, GKE, SLURM or Open MPI JAX's own
                  cluster detection finds the processes when these are not given.

When training ends (not preempted, no --max_steps), process 0 writes WORKDIR/finished.json: the
marker launch/supervise.sh waits for.
"""
from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

# These import no JAX: JAX is imported after absl parsed the flags (and malloc is tuned).
from npp_jax import distributed, logs, malloc

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go (local or gs://).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Stop after this many steps of this run.")
_LIBRARY_LOGS = flags.DEFINE_bool("library_logs", False, "Show orbax/grain INFO logs.")
_TUNE_MALLOC = flags.DEFINE_bool("tune_malloc", True, "On a CPU-only host, keep freed memory in "
                                 "one glibc malloc arena (npp_jax.malloc); off: glibc's defaults.")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume even though the config changes what the run computes "
    "(model, schedule, optimizer, batch size, seed, splits); by default such a resume is refused.")
distributed.define_flags()
flags.adopt_module_key_flags(distributed)  # listed by --help
flags.mark_flags_as_required(["config", "workdir"])
FINISHED = "finished.json"  # the marker of a finished run in the workdir.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _LIBRARY_LOGS.value:
    logs.quiet_library_logs()
  if _TUNE_MALLOC.value and malloc.cpu_only():
    malloc.tune_malloc()  # before JAX starts its CPU client's threads.
  import jax  # after absl parsed the flags, so JAX's own flags see the environment.

  distributed.initialize_from_flags()
  from npp_jax import checkpoint, train  # noqa: E402  (jax-dependent modules after initialisation)

  checkpoint.install_preemption_handler()  # SIGTERM: save at the next step, then exit cleanly.
  marker = checkpoint.as_path(_WORKDIR.value) / FINISHED
  if jax.process_index() == 0 and marker.exists():
    marker.unlink()  # a run that starts is not finished (its config may extend the schedule).
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, max_steps=_MAX_STEPS.value,
                                     allow_config_change=_ALLOW_CHANGE.value)
  if jax.process_index() == 0 and summary.get("preempted"):
    print(f"Preempted at step {summary['step']} (train loss {summary['train_loss']}): saved; run "
          f"the same command again to resume.\n  checkpoints: {summary['workdir']}/checkpoints")
  elif jax.process_index() == 0:
    if _MAX_STEPS.value is None:  # the whole schedule ran: what launch/supervise.sh waits for.
      marker.write_text(json.dumps({k: summary.get(k) for k in ("step", "train_loss", "eval_loss")})
                        + "\n")
    first = summary["seconds_to_first_step"]
    print(f"Training finished at step {summary['step']} "
          f"(train loss {summary['train_loss']}, eval loss {summary.get('eval_loss')}).\n"
          f"  wall clock: {summary['train_seconds']:.0f} s to train"
          + (f" ({first:.0f} s of it to the first step)" if first is not None else "")
          + f", {summary['finish_seconds']:.0f} s to evaluate and report")
    for line in summary.get("report", ()):  # from the hooks (e.g. a built-in data set's report).
      print(f"  {line}")
    print(f"  training cost relative to next-token prediction: {summary['training_cost']:.3f}\n"
          f"  checkpoints: {summary['workdir']}/checkpoints\n"
          f"  TensorBoard: tensorboard --logdir {summary['workdir']}")


if __name__ == "__main__":
  app.run(main)
