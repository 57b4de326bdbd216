#!/usr/bin/env bash
# Keeps an npp_jax run going on a (spot) TPU slice until it reports itself finished: recreates a
# preempted or deleted slice, sets it up and reruns the same run.sh command, which resumes.
set -euo pipefail

PROG=launch/supervise.sh
USAGE="Usage: $PROG NAME --zone ZONE --accelerator TYPE [--spot] [--queued] [--version RUNTIME]
       [--wheelhouse gs://BUCKET/wheels | --repo URL [--ref REF]] [--done gs://.../FILE]
       [--poll SECONDS] [--max_restarts N] [--delete_when_done] [--project PROJECT] [--dry_run]
       -- RUN_ARGS...

Every --poll seconds (default 120) until the run is finished:
  1. finished?  'gcloud storage ls DONE' finds the file the run writes when it completes:
                train: WORKDIR/finished.json (npp_jax.main writes it when the whole schedule ran,
                not after a preemption or --max_steps); sample: OUT/samples.npz; extract:
                OUT/metadata.json (--config.out). Pass --done when RUN_ARGS do not name it.
  2. the slice: missing, PREEMPTED, TERMINATED, STOPPED, FAILED or SUSPENDED -> delete what is
                left and create it again (create_tpu.sh with --accelerator, --spot, --queued,
                --version); still being created or waiting for capacity -> wait.
  3. the run:   slice READY and no run alive on any worker -> setup_workers.sh (once per slice;
                --wheelhouse, --repo, --ref go to it) and run.sh RUN_ARGS, which resumes from
                the workdir. A run that stops on a healthy slice without finishing (a crash,
                stop.sh) is rerun at most --max_restarts times (default 3), then this exits 1.

  RUN_ARGS          run.sh's arguments after NAME/--zone, e.g. --config configs/npp_xl.py
                    --workdir gs://BUCKET/runs/npp_xl -- --config.data.path=gs://BUCKET/tokens
                    (or --cli sample / --cli extract ...).
  --delete_when_done  delete the slice once the run is finished.
  --dry_run         print the commands of one round that finds no slice (state query, create,
                    setup, run) instead of running anything.
Stop supervising with Ctrl-C (the run goes on); launch/stop.sh stops the run."

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR=""
VERSION=""
SPOT=0
QUEUED=0
DONE=""
POLL=120
MAX_RESTARTS=3
DELETE_WHEN_DONE=0
SETUP_ARGS=()
RUN_ARGS=()
while (($#)); do
  case "$1" in
    --accelerator | --accelerator=*) flag_value "$@"; ACCELERATOR=$FLAG_VALUE ;;
    --version | --version=*) flag_value "$@"; VERSION=$FLAG_VALUE ;;
    --spot) SPOT=1; FLAG_SHIFT=1 ;;
    --queued) QUEUED=1; FLAG_SHIFT=1 ;;
    --wheelhouse | --wheelhouse=* | --repo | --repo=* | --ref | --ref=*)
      flag_value "$@"; SETUP_ARGS+=("${1%%=*}=$FLAG_VALUE") ;;
    --done | --done=*) flag_value "$@"; DONE=$FLAG_VALUE ;;
    --poll | --poll=*) flag_value "$@"; POLL=$FLAG_VALUE ;;
    --max_restarts | --max_restarts=*) flag_value "$@"; MAX_RESTARTS=$FLAG_VALUE ;;
    --delete_when_done) DELETE_WHEN_DONE=1; FLAG_SHIFT=1 ;;
    --) shift; RUN_ARGS=("$@"); break ;;
    *) common_flag "$@" ;;
  esac
  shift "$FLAG_SHIFT"
done

require_name_and_zone
[[ -n $ACCELERATOR ]] || die "missing --accelerator (the slice to recreate, e.g. v5litepod-64)"
[[ $POLL =~ ^[0-9]+$ ]] || die "bad --poll '$POLL' (expected whole seconds)"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "bad --max_restarts '$MAX_RESTARTS' (expected a count)"
((${#RUN_ARGS[@]})) || die "missing RUN_ARGS after '--' (run.sh's --config, --workdir, ...)"

# The file that tells the run finished, from RUN_ARGS (see the usage) unless --done names it.
run_arg() { arg_value "$1" "${RUN_ARGS[@]}"; }  # the value of run.sh flag $1 in RUN_ARGS
if [[ -z $DONE ]]; then
  case "$(run_arg --cli)" in
    "" | train) DONE=$(run_arg --workdir)/finished.json ;;
    sample) DONE=$(run_arg --out)/samples.npz ;;
    extract) DONE=$(run_arg --config.out)/metadata.json ;;
  esac
fi
[[ $DONE == gs://?*/?* ]] ||
  die "cannot tell when the run is finished: '$DONE' is not a gs:// file; pass --done gs://..."

# The arguments every sibling script takes.
WHERE=("$NAME" "--zone=$ZONE")
if [[ -n $PROJECT ]]; then
  WHERE+=("--project=$PROJECT")
fi
CREATE_ARGS=("--accelerator=$ACCELERATOR")
if [[ -n $VERSION ]]; then CREATE_ARGS+=("--version=$VERSION"); fi
if ((SPOT)); then CREATE_ARGS+=(--spot); fi
if ((QUEUED)); then CREATE_ARGS+=(--queued); fi
DRY=()
if ((DRY_RUN)); then DRY=(--dry_run); fi

sibling() {  # runs launch/$1 with the slice's arguments; prints nothing itself
  local script=$1
  shift
  "$LAUNCH_DIR/$script" "${DRY[@]+"${DRY[@]}"}" "${WHERE[@]}" "$@"
}

is_done() {
  gcloud storage ls "$DONE" >/dev/null 2>&1
}

# Prints the slice's state: READY, CREATING, PREEMPTED, ... (queued: ACTIVE, PROVISIONING,
# SUSPENDED, ...), NOT_FOUND when it does not exist, UNKNOWN when gcloud failed otherwise.
if ((QUEUED)); then
  DESCRIBE=(queued-resources describe "$NAME" "--format=value(state.state)")
else
  DESCRIBE=(tpu-vm describe "$NAME" "--format=value(state)")
fi
slice_state() {
  local out
  if out=$(gcloud_tpus "${DESCRIBE[@]}" 2>&1); then
    printf '%s\n' "${out##*$'\n'}"
  elif [[ $out == *NOT_FOUND* || $out == *"not found"* ]]; then
    echo NOT_FOUND
  else
    note "gcloud could not describe $NAME: ${out##*$'\n'}"
    echo UNKNOWN
  fi
}

run_alive() {  # true when the run is alive on some worker
  local check="$REMOTE_ALIVE
if [ -f \"$REMOTE_PIDFILE\" ] && alive \"\$(cat \"$REMOTE_PIDFILE\")\"; then echo npp_jax_run_alive; fi"
  on_workers all "$check" 2>/dev/null | grep -q npp_jax_run_alive
}

delete_slice() {
  if ((QUEUED)); then sibling delete_tpu.sh --queued --yes; else sibling delete_tpu.sh --yes; fi
}

recreate() {
  if [[ $1 != NOT_FOUND ]]; then
    note "$NAME is $1: deleting it to create it again"
    delete_slice || true
  fi
  note "creating $NAME (${CREATE_ARGS[*]})"
  sibling create_tpu.sh "${CREATE_ARGS[@]}" || note "create failed; retrying in $POLL s"
}

# Bad arguments for the sibling scripts stop here, not at the first recovery.
"$LAUNCH_DIR/create_tpu.sh" --dry_run "${WHERE[@]}" "${CREATE_ARGS[@]}" >/dev/null ||
  die "launch/create_tpu.sh refused the slice's arguments (above)"
"$LAUNCH_DIR/run.sh" --dry_run "${WHERE[@]}" "${RUN_ARGS[@]}" >/dev/null ||
  die "launch/run.sh refused RUN_ARGS (above)"

if ((DRY_RUN)); then  # one round that finds no slice: every command it would run, printed.
  run gcloud storage ls "$DONE"
  gcloud_tpus "${DESCRIBE[@]}"
  recreate NOT_FOUND
  sibling setup_workers.sh "${SETUP_ARGS[@]+"${SETUP_ARGS[@]}"}"
  sibling run.sh "${RUN_ARGS[@]}"
  exit 0
fi

set_up=0      # setup_workers.sh ran on this incarnation of the slice
started=0     # a run was started on this incarnation
restarts=0    # runs that stopped on a healthy slice without finishing
while :; do
  if is_done; then
    note "finished: $DONE exists"
    if ((DELETE_WHEN_DONE)); then
      delete_slice
    fi
    exit 0
  fi
  state=$(slice_state)
  case "$state" in
    READY | ACTIVE)
      if ! run_alive; then
        if ((started)); then
          restarts=$((restarts + 1))
          if ((restarts > MAX_RESTARTS)); then
            note "the run stopped $restarts times on a healthy slice without finishing $DONE;" \
              "see its logs: launch/run.sh $NAME --zone $ZONE --logs"
            exit 1
          fi
          note "the run stopped without finishing; rerunning it ($restarts of $MAX_RESTARTS)"
        fi
        if ((!set_up)); then
          note "setting up the workers of $NAME"
          if sibling setup_workers.sh "${SETUP_ARGS[@]+"${SETUP_ARGS[@]}"}"; then set_up=1; fi
        fi
        if ((set_up)); then
          note "starting the run on $NAME"
          if sibling run.sh "${RUN_ARGS[@]}"; then started=1; fi
        fi
      fi ;;
    NOT_FOUND | PREEMPTED | TERMINATED | STOPPED | FAILED | SUSPENDED)
      recreate "$state"
      set_up=0
      started=0 ;;
    *) note "$NAME is $state; waiting" ;;
  esac
  sleep "$POLL"
done
