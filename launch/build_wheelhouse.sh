#!/usr/bin/env bash
# Builds a wheelhouse for TPU workers without internet: every wheel `pip install -e ".[tpu]"`
# needs on the workers' platform, uploaded to a GCS bucket that setup_workers.sh --wheelhouse reads.
set -euo pipefail

PROG=launch/build_wheelhouse.sh
USAGE="Usage: $PROG gs://BUCKET/wheels [--python_version 3.11] [--platform manylinux_2_35_x86_64]
       [--dry_run]

Run on a machine with internet (and gcloud credentials for the bucket), from this checkout:
  1. pip wheel --no-deps this checkout (npp_jax itself);
  2. pip download, for --python_version and --platform only, the binary wheels of npp_jax[tpu]
     and every dependency, plus pip, setuptools and wheel (what the editable install on the
     workers builds with);
  3. gcloud storage cp them to gs://BUCKET/wheels.
Then: launch/setup_workers.sh NAME --zone ZONE --wheelhouse gs://BUCKET/wheels

  --python_version  the workers' Python (default 3.11, what setup_workers.sh installs).
  --platform        the workers' platform tag (default manylinux_2_35_x86_64: glibc 2.35, the
                    Ubuntu 22.04 of the TPU VM images; older manylinux wheels are included).
  --dry_run         print the commands instead of running them."

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DEST=""
PY_VERSION=3.11
PLATFORM=manylinux_2_35_x86_64
while (($#)); do
  case "$1" in
    --python_version | --python_version=*) flag_value "$@"; PY_VERSION=$FLAG_VALUE ;;
    --platform | --platform=*) flag_value "$@"; PLATFORM=$FLAG_VALUE ;;
    --dry_run | --dry-run | -h | --help) common_flag "$@" ;;
    -*) die "unknown flag: $1" ;;
    *)
      [[ -z $DEST ]] || die "unexpected argument '$1' (the destination is already '$DEST')"
      DEST=$1
      FLAG_SHIFT=1 ;;
  esac
  shift "$FLAG_SHIFT"
done

[[ -n $DEST ]] || die "missing the destination gs://BUCKET/PATH (first positional argument)"
[[ $DEST =~ ^gs://[a-z0-9][-a-z0-9_.]*[a-z0-9](/.*)?$ ]] ||
  die "bad destination '$DEST' (expected gs://BUCKET/PATH)"
[[ $PY_VERSION =~ ^3\.[0-9]+$ ]] || die "bad --python_version '$PY_VERSION' (expected e.g. 3.11)"
[[ $PLATFORM =~ ^[a-z0-9_]+$ ]] || die "bad --platform '$PLATFORM'"

WHEELS="${TMPDIR:-/tmp}/npp_jax_wheels.$$"
if ((!DRY_RUN)); then
  trap 'rm -rf "$WHEELS"' EXIT
fi
run python3 -m pip wheel -q --no-deps --wheel-dir "$WHEELS" "$REPO_ROOT"
OWN_WHEEL="$WHEELS/npp_jax-*.whl"  # its name once built (printed as a pattern under --dry_run)
if ((!DRY_RUN)); then
  OWN_WHEEL=$(ls "$WHEELS"/npp_jax-*.whl)
fi
run python3 -m pip download -q --dest "$WHEELS" --only-binary=:all: "--platform=$PLATFORM" \
  "--python-version=$PY_VERSION" "$OWN_WHEEL[tpu]" pip setuptools wheel
run gcloud storage cp "$WHEELS/*" "${DEST%/}/"
if ((!DRY_RUN)); then
  note "wheelhouse ready: $DEST ($(find "$WHEELS" -name '*.whl' | wc -l) wheels)"
fi
