#!/usr/bin/env bash
# Deletes a TPU VM or pod slice (or its queued-resource request). The gs:// workdir stays.
set -euo pipefail

PROG=launch/delete_tpu.sh
USAGE="Usage: $PROG NAME --zone ZONE [--queued] [--yes] [--project PROJECT] [--dry_run]

Deletes TPU NAME and its workers' disks (logs in ~/npp_jax_logs go with them; checkpoints and
TensorBoard events in the gs:// workdir stay).

  --queued    NAME was created with create_tpu.sh --queued: delete the queued resource
              together with its TPU (--force).
  --yes       do not ask for confirmation (gcloud --quiet).
  --project   GCP project (default: gcloud's configured project).
  --dry_run   print the gcloud command instead of running it."

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
YES=0
while (($#)); do
  case "$1" in
    --queued) QUEUED=1; FLAG_SHIFT=1 ;;
    --yes) YES=1; FLAG_SHIFT=1 ;;
    *) common_flag "$@" ;;
  esac
  shift "$FLAG_SHIFT"
done

require_name_and_zone
if ((QUEUED)); then
  args=(queued-resources delete "$NAME" --force)
else
  args=(tpu-vm delete "$NAME")
fi
if ((YES)); then
  args+=(--quiet)
fi
gcloud_tpus "${args[@]}"
