#!/usr/bin/env bash
# Creates a Cloud TPU VM (one host) or pod slice (several hosts) for npp_jax.
set -euo pipefail

PROG=launch/create_tpu.sh
USAGE="Usage: $PROG NAME --zone ZONE --accelerator TYPE [--version RUNTIME]
       [--spot | --preemptible] [--queued] [--project PROJECT] [--dry_run]

Creates the TPU VM or pod slice NAME (all its workers) with gcloud.

  --zone         zone with capacity for TYPE, e.g. us-central2-b (v4), us-west4-a (v5e).
  --accelerator  accelerator type: v5litepod-64, v4-32, v5p-128, v6e-256, ... (chips or cores
                 as gcloud names them; every type above one host's size is a pod slice).
  --version      TPU software (runtime) version. Default by family: v5litepod ->
                 v2-alpha-tpuv5-lite, v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e,
                 v2/v3/v4 -> tpu-ubuntu2204-base.
  --spot         spot capacity: much cheaper, preempted at any time, never restarted (delete
                 and recreate it; run.sh then resumes from the last checkpoint).
  --preemptible  legacy preemptible capacity (tpu-vm create only; prefer --spot).
  --queued       request NAME through 'queued-resources create' (node id NAME): the request
                 waits until capacity is free, the usual way to get large pod slices. Watch it
                 with 'gcloud compute tpus queued-resources describe NAME --zone ZONE';
                 delete with 'launch/delete_tpu.sh NAME --zone ZONE --queued'.
  --project      GCP project (default: gcloud's configured project).
  --dry_run      print the gcloud command instead of running it.

Next: launch/setup_workers.sh NAME --zone ZONE"

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR=""
VERSION=""
CAPACITY=""  # "", "spot" or "preemptible"
QUEUED=0
while (($#)); do
  case "$1" in
    --accelerator | --accelerator=* | --accelerator-type | --accelerator-type=*)
      flag_value "$@"; ACCELERATOR=$FLAG_VALUE ;;
    --version | --version=* | --runtime-version | --runtime-version=*)
      flag_value "$@"; VERSION=$FLAG_VALUE ;;
    --spot | --preemptible)
      [[ -z $CAPACITY || $CAPACITY == "${1#--}" ]] ||
        die "--spot and --preemptible exclude each other"
      CAPACITY=${1#--}
      FLAG_SHIFT=1 ;;
    --queued) QUEUED=1; FLAG_SHIFT=1 ;;
    *) common_flag "$@" ;;
  esac
  shift "$FLAG_SHIFT"
done

require_name_and_zone
[[ -n $ACCELERATOR ]] || die "missing --accelerator (e.g. --accelerator v5litepod-64)"
[[ $ACCELERATOR =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  die "bad --accelerator '$ACCELERATOR' (expected e.g. v5litepod-64, v4-32, v5p-128, v6e-256)"

if [[ -z $VERSION ]]; then
  case "$ACCELERATOR" in
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) VERSION=tpu-ubuntu2204-base ;;
    *) die "no default runtime for --accelerator '$ACCELERATOR'; pass --version" ;;
  esac
fi

if ((QUEUED)); then
  [[ $CAPACITY != preemptible ]] ||
    die "--preemptible does not exist for --queued requests; use --spot"
  args=(queued-resources create "$NAME" "--node-id=$NAME" "--accelerator-type=$ACCELERATOR"
        "--runtime-version=$VERSION")
else
  args=(tpu-vm create "$NAME" "--accelerator-type=$ACCELERATOR" "--version=$VERSION")
fi
if [[ -n $CAPACITY ]]; then
  args+=("--$CAPACITY")
fi
gcloud_tpus "${args[@]}"

if ((QUEUED)) && ((!DRY_RUN)); then
  note "queued; the TPU exists once 'gcloud compute tpus queued-resources describe $NAME" \
       "--zone $ZONE' says ACTIVE"
fi
