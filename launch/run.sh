#!/usr/bin/env bash
# Starts the same npp_jax command (training, sampling or tokenising) on every worker of a TPU VM
# or pod slice, detached from the ssh session, or tails the workers' logs.
set -euo pipefail

PROG=launch/run.sh
USAGE="Usage: $PROG NAME --zone ZONE [--cli train] --config CONFIG --workdir gs://BUCKET/PATH
       [--allow_local] [--attach] [--worker W] [--project PROJECT] [--dry_run] [-- CLI_FLAGS...]
   or: $PROG NAME --zone ZONE --cli sample|extract --config CONFIG [--allow_local] [--attach]
       [--worker W] [--project PROJECT] [--dry_run] -- CLI_FLAGS...
   or: $PROG NAME --zone ZONE --logs [--cli C] [--worker W] [--project PROJECT] [--dry_run]

Runs, on every worker of TPU NAME (--worker=all), in ~/npp_jax with ~/npp_jax_venv active, one of
  train:   python -m npp_jax.main --config=CONFIG --workdir=WORKDIR CLI_FLAGS...
  sample:  python -m npp_jax.sample --config=CONFIG CLI_FLAGS...   (--checkpoint=... --out=gs://...)
  extract: python -m npp_jax.extract_codes --config=CONFIG CLI_FLAGS...
in the background (nohup + setsid: an ssh drop does not stop it), appending to
~/npp_jax_logs/CLI.log (train.log, sample.log, extract.log) on each worker. jax.distributed
starts by itself on TPU pods. Rerunning the same command after a preemption or stop.sh resumes
(training from the latest checkpoint in WORKDIR, sampling and tokenising from what is written).

  --cli          train (default), sample or extract.
  --config       config file relative to the repository root, optionally with its argument,
                 e.g. configs/npp_xl.py or configs/extract_imagenet.py:folder.
  --workdir      train: gs:// directory for checkpoints and TensorBoard events; every worker
                 must see the same one. Sample and extract write where --out / --config.out say
                 (gs:// too, checked when given after '--').
  --allow_local  accept a local --workdir / --out (a single-host TPU VM only).
  CLI_FLAGS      passed through verbatim, e.g. --config.data.path=gs://BUCKET/imagenet256_tokens
                 --config.optim.lr=3e-4 --max_steps=10.
  --attach       after starting, follow the log of worker W (Ctrl-C stops following only).
  --logs         only follow the log of worker W (of --cli's runs); start nothing.
  --worker W     the worker whose log --attach/--logs follow: an index or 'all' (default 0).
  --project      GCP project (default: gcloud's configured project).
  --dry_run      print the gcloud commands (with the script run on the workers) instead."

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CLI=train
CONFIG=""
WORKDIR=""
ALLOW_LOCAL=0
ATTACH=0
LOGS=0
WORKER=""
MAIN_FLAGS=()
while (($#)); do
  case "$1" in
    --cli | --cli=*) flag_value "$@"; CLI=$FLAG_VALUE ;;
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
MODULE=$(cli_module "$CLI")
[[ -n $MODULE ]] || die "bad --cli '$CLI' (expected train, sample or extract)"
REMOTE_LOG="$REMOTE_LOGS/$CLI.log"
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
CONFIG_FILE=${CONFIG%%:*}
[[ $CONFIG_FILE =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*\.py$ ]] ||
  die "--config '$CONFIG' must be a .py file relative to the repository root" \
    "(e.g. configs/npp_xl.py)"

# Dies unless $2 (the value of flag $1) is a gs:// path with a valid bucket, or --allow_local.
require_shared() {
  if [[ $2 != gs://* ]]; then
    ((ALLOW_LOCAL)) || die "$1 '$2' is not a gs:// path: the workers of a pod slice" \
      "must share it (pass --allow_local on a single-host TPU VM)"
  elif ! [[ $2 =~ ^gs://[a-z0-9][-a-z0-9_.]*[a-z0-9](/.*)?$ ]]; then
    die "$1 '$2' has no valid bucket name (expected gs://BUCKET/PATH)"
  fi
}

for flag in ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}; do
  case "$flag" in
    --config | --config=*) die "pass '$flag' as run.sh's own --config, not after '--'" ;;
    --workdir | --workdir=*) [[ $CLI != train ]] ||
      die "pass '$flag' as run.sh's own --workdir, not after '--'" ;;
  esac
done
ARGS=("--config=$CONFIG")
case "$CLI" in
  train)
    [[ -n $WORKDIR ]] || die "missing --workdir (e.g. --workdir gs://BUCKET/runs/npp_xl)"
    require_shared --workdir "$WORKDIR"
    ARGS+=("--workdir=$WORKDIR") ;;
  sample)
    [[ -z $WORKDIR ]] || die "--workdir is for --cli train; sample writes to --out (after '--')"
    OUT=$(arg_value --out ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"})
    [[ -n $OUT && -n $(arg_value --checkpoint ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}) ]] ||
      die "--cli sample needs --checkpoint=... and --out=gs://... after '--'"
    require_shared --out "$OUT" ;;
  extract)
    [[ -z $WORKDIR ]] || die "--workdir is for --cli train; extract writes to --config.out"
    OUT=$(arg_value --config.out ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"})
    if [[ -n $OUT ]]; then require_shared --config.out "$OUT"; fi ;;
esac

MAIN_CMD="python -m $MODULE"
for arg in "${ARGS[@]}" ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}; do
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
