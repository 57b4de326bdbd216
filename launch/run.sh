#!/usr/bin/env bash
# Starts the same `python -m npp_jax.main ...` on every worker of a TPU VM or pod slice, detached
# from the ssh session, or tails the workers' logs.
set -euo pipefail

PROG=launch/run.sh
USAGE="Usage: $PROG NAME --zone ZONE --config CONFIG --workdir gs://BUCKET/PATH
       [--allow_local] [--attach] [--worker W] [--project PROJECT] [--dry_run] [-- MAIN_FLAGS...]
   or: $PROG NAME --zone ZONE --logs [--worker W] [--project PROJECT] [--dry_run]

Runs, on every worker of TPU NAME (--worker=all), in ~/npp_jax with ~/npp_jax_venv active:
  python -m npp_jax.main --config=CONFIG --workdir=WORKDIR MAIN_FLAGS...
in the background (nohup + setsid: an ssh drop does not stop it), appending to
~/npp_jax_logs/train.log on each worker. jax.distributed starts by itself on TPU pods.
Rerunning it after a preemption or stop.sh resumes from the latest checkpoint in WORKDIR.

  --config       config file relative to the repository root, optionally with its argument,
                 e.g. configs/npp_xl.py or configs/npp_xl.py:runlocal.
  --workdir      gs:// directory for checkpoints and TensorBoard events; every worker must see
                 the same one.
  --allow_local  accept a local --workdir (a single-host TPU VM only).
  MAIN_FLAGS     passed through verbatim, e.g. --config.data.path=gs://BUCKET/imagenet256_tokens
                 --config.optim.lr=3e-4 --max_steps=10.
  --attach       after starting, follow the log of worker W (Ctrl-C stops following only).
  --logs         only follow the log of worker W; start nothing.
  --worker W     the worker whose log --attach/--logs follow: an index or 'all' (default 0).
  --project      GCP project (default: gcloud's configured project).
  --dry_run      print the gcloud commands (with the script run on the workers) instead."

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=""
WORKDIR=""
ALLOW_LOCAL=0
ATTACH=0
LOGS=0
WORKER=""
MAIN_FLAGS=()
while (($#)); do
  case "$1" in
    --config | --config=*) flag_value "$@"; CONFIG=$FLAG_VALUE ;;
    --workdir | --workdir=*) flag_value "$@"; WORKDIR=$FLAG_VALUE ;;
    --allow_local) ALLOW_LOCAL=1; FLAG_SHIFT=1 ;;
    --attach) ATTACH=1; FLAG_SHIFT=1 ;;
    --logs) LOGS=1; FLAG_SHIFT=1 ;;
    --worker | --worker=*) flag_value "$@"; WORKER=$FLAG_VALUE ;;
    --) shift; MAIN_FLAGS=("$@"); break ;;
    *) common_flag "$@" ;;
  esac
  shift "$FLAG_SHIFT"
done

require_name_and_zone
if [[ -n $WORKER ]]; then
  require_worker "$WORKER"
  ((LOGS || ATTACH)) || die "--worker only picks the log that --logs/--attach follow" \
    "(a run always starts on all workers)"
fi
WORKER=${WORKER:-0}

# Follows worker $WORKER's log; lines carry the worker's host name when following all of them.
follow_logs() {
  local tail_cmd="tail -n 100 -F \"$REMOTE_LOG\""
  if [[ $WORKER == all ]]; then
    tail_cmd+=" | sed -u \"s/^/\$(hostname): /\""
  fi
  on_workers "$WORKER" "$tail_cmd"
}

if ((LOGS)); then
  ((!ATTACH)) ||
    die "--logs and --attach exclude each other (--attach starts a run, --logs does not)"
  ((${#MAIN_FLAGS[@]} == 0)) || die "--logs starts nothing; drop the flags after '--'"
  follow_logs
  exit 0
fi

[[ -n $CONFIG ]] || die "missing --config (e.g. --config configs/npp_xl.py)"
[[ -n $WORKDIR ]] || die "missing --workdir (e.g. --workdir gs://BUCKET/runs/npp_xl)"
CONFIG_FILE=${CONFIG%%:*}
[[ $CONFIG_FILE =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*\.py$ ]] ||
  die "--config '$CONFIG' must be a .py file relative to the repository root" \
    "(e.g. configs/npp_xl.py)"
if [[ $WORKDIR != gs://* ]]; then
  ((ALLOW_LOCAL)) || die "--workdir '$WORKDIR' is not a gs:// path: the workers of a pod slice" \
    "must share checkpoints (pass --allow_local on a single-host TPU VM)"
elif ! [[ $WORKDIR =~ ^gs://[a-z0-9][-a-z0-9_.]*[a-z0-9](/.*)?$ ]]; then
  die "--workdir '$WORKDIR' has no valid bucket name (expected gs://BUCKET/PATH)"
fi
for flag in ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}; do
  case "$flag" in
    --config | --config=* | --workdir | --workdir=*)
      die "pass '$flag' as run.sh's own --config/--workdir, not after '--'" ;;
  esac
done

MAIN_CMD="python -m npp_jax.main"
for arg in "--config=$CONFIG" "--workdir=$WORKDIR" ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}; do
  MAIN_CMD+=" $(shquote "$arg")"
done
SETUP_HINT="run launch/setup_workers.sh first"

REMOTE_SCRIPT="set -eu
cd \"$REMOTE_SRC\" 2>/dev/null || {
  echo \"\$(hostname): no $REMOTE_SRC; $SETUP_HINT\" >&2; exit 2
}
if [ ! -f \"$REMOTE_VENV/bin/activate\" ]; then
  echo \"\$(hostname): no venv $REMOTE_VENV; $SETUP_HINT\" >&2; exit 2
fi
if [ ! -f $CONFIG_FILE ]; then
  echo \"\$(hostname): config file $CONFIG_FILE not found in $REMOTE_SRC\" >&2; exit 2
fi
mkdir -p \"$REMOTE_LOGS\"
PIDFILE=\"$REMOTE_PIDFILE\"
$REMOTE_ALIVE
if [ -f \"\$PIDFILE\" ] && alive \"\$(cat \"\$PIDFILE\")\"; then
  echo \"\$(hostname): a run is going (pid \$(cat \"\$PIDFILE\")); stop it: launch/stop.sh\" >&2
  exit 3
fi
. \"$REMOTE_VENV/bin/activate\"
set -- $MAIN_CMD
echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) \$(hostname): \$*\" >> \"$REMOTE_LOG\"
PYTHONUNBUFFERED=1 nohup setsid \"\$@\" >> \"$REMOTE_LOG\" 2>&1 < /dev/null &
echo \$! > \"\$PIDFILE\"
echo \"\$(hostname): started pid \$!, log $REMOTE_LOG\""

on_workers all "$REMOTE_SCRIPT"
if ((ATTACH)); then
  follow_logs
fi
