#!/usr/bin/env bash
# Stops the npp_jax run started by run.sh on every worker: SIGTERM first (the trainer takes it
# as a preemption notice and saves a checkpoint), SIGKILL after a grace period.
set -euo pipefail

PROG=launch/stop.sh
USAGE="Usage: $PROG NAME --zone ZONE [--grace SECONDS] [--project PROJECT] [--dry_run]

On every worker of TPU NAME: sends SIGTERM to the process group of the run recorded in
~/npp_jax_logs/run.pid, waits up to --grace seconds (default 300) for it to save and exit,
then SIGKILLs what is left. The TPU VM keeps running (delete it with launch/delete_tpu.sh);
launch/run.sh with the same --workdir resumes from the latest checkpoint.

  --grace     seconds to wait after SIGTERM before SIGKILL (default 300).
  --project   GCP project (default: gcloud's configured project).
  --dry_run   print the gcloud command (with the script run on the workers) instead."

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GRACE=300
while (($#)); do
  case "$1" in
    --grace | --grace=*) flag_value "$@"; GRACE=$FLAG_VALUE ;;
    *) common_flag "$@" ;;
  esac
  shift "$FLAG_SHIFT"
done

require_name_and_zone
[[ $GRACE =~ ^[0-9]+$ ]] || die "bad --grace '$GRACE' (expected whole seconds)"

# run.sh started the trainer under setsid, so its pid is also its process group id: signalling
# the group reaches the grain worker processes too.
REMOTE_SCRIPT="set -eu
PIDFILE=\"$REMOTE_PIDFILE\"
$REMOTE_ALIVE
if [ ! -f \"\$PIDFILE\" ]; then echo \"\$(hostname): no run recorded\"; exit 0; fi
pid=\$(cat \"\$PIDFILE\")
if alive \"\$pid\"; then
  kill -TERM -- \"-\$pid\" 2>/dev/null || kill -TERM \"\$pid\" 2>/dev/null || true
  waited=0
  while alive \"\$pid\" && [ \"\$waited\" -lt $GRACE ]; do sleep 1; waited=\$((waited + 1)); done
  if alive \"\$pid\"; then
    kill -KILL -- \"-\$pid\" 2>/dev/null || kill -KILL \"\$pid\" 2>/dev/null || true
    echo \"\$(hostname): pid \$pid killed after $GRACE s\"
  else
    echo \"\$(hostname): pid \$pid stopped after \$waited s\"
  fi
else
  echo \"\$(hostname): pid \$pid is not running\"
fi
rm -f \"\$PIDFILE\""

on_workers all "$REMOTE_SCRIPT"
