#!/usr/bin/env bash
# Puts the npp_jax sources and a virtual environment with `pip install -e ".[tpu]"` on every
# worker of a TPU VM or pod slice. Idempotent: rerun it after changing the code.
set -euo pipefail

PROG=launch/setup_workers.sh
USAGE="Usage: $PROG NAME --zone ZONE [--local_src DIR | --repo URL [--ref GIT_REF] | --ref GIT_REF]
       [--wheelhouse gs://BUCKET/wheels] [--python python3.11] [--project PROJECT] [--dry_run]

On every worker of TPU NAME: places the sources in ~/npp_jax, creates the virtual environment
~/npp_jax_venv (installing the Python interpreter with apt when the image lacks it) and runs
pip install -e \".[tpu]\" in it. Safe to rerun: sources are replaced, the venv is reused.

Where the sources come from (default: --local_src with this checkout):
  --local_src DIR  tar the working tree of DIR (git-tracked and untracked files that git does
                   not ignore; the whole directory when DIR is not a git checkout) and scp it.
  --repo URL       git clone URL on every worker (URL must be cloneable from the workers).
  --ref GIT_REF    branch, tag or commit to check out (default: the remote's HEAD). Without
                   --repo, URL is the 'origin' remote of this checkout.
Where the packages come from (default: the package index, which the workers must reach):
  --wheelhouse gs://BUCKET/wheels
                   workers without internet: copy the wheels launch/build_wheelhouse.sh put
                   there to ~/npp_jax_wheels and install only from them (pip --no-index).
Other flags:
  --python PY      interpreter for the venv (default python3.11; npp_jax needs >= 3.11).
  --project        GCP project (default: gcloud's configured project).
  --dry_run        print the commands (local tar, gcloud scp/ssh) instead of running them.

Next: launch/run.sh NAME --zone ZONE --config configs/npp_xl.py --workdir gs://BUCKET/runs/npp_xl"

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LOCAL_SRC=""
REPO=""
REF=""
PYTHON=python3.11
WHEELHOUSE=""
while (($#)); do
  case "$1" in
    --local_src | --local_src=*) flag_value "$@"; LOCAL_SRC=$FLAG_VALUE ;;
    --repo | --repo=*) flag_value "$@"; REPO=$FLAG_VALUE ;;
    --ref | --ref=*) flag_value "$@"; REF=$FLAG_VALUE ;;
    --python | --python=*) flag_value "$@"; PYTHON=$FLAG_VALUE ;;
    --wheelhouse | --wheelhouse=*) flag_value "$@"; WHEELHOUSE=$FLAG_VALUE ;;
    *) common_flag "$@" ;;
  esac
  shift "$FLAG_SHIFT"
done

require_name_and_zone
[[ $PYTHON =~ ^python3\.[0-9]+$ ]] || die "bad --python '$PYTHON' (expected e.g. python3.11)"
[[ -z $WHEELHOUSE || $WHEELHOUSE =~ ^gs://[a-z0-9][-a-z0-9_.]*[a-z0-9](/.*)?$ ]] ||
  die "bad --wheelhouse '$WHEELHOUSE' (expected gs://BUCKET/PATH)"
if [[ -n $LOCAL_SRC && (-n $REPO || -n $REF) ]]; then
  die "--local_src excludes --repo and --ref (sources come either from a tarball or from git)"
fi
if [[ -n $REF && -z $REPO ]]; then
  REPO=$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null) ||
    die "--ref without --repo needs an 'origin' remote in $REPO_ROOT; pass --repo URL"
fi
if [[ -z $REPO && -z $LOCAL_SRC ]]; then
  LOCAL_SRC=$REPO_ROOT
fi
if [[ -n $LOCAL_SRC ]]; then
  [[ -d $LOCAL_SRC ]] || die "--local_src '$LOCAL_SRC' is not a directory"
  LOCAL_SRC=$(cd "$LOCAL_SRC" && pwd)
  [[ -f $LOCAL_SRC/setup.py ]] ||
    die "--local_src '$LOCAL_SRC' has no setup.py (not an npp_jax checkout)"
fi

# Writes a gzipped tarball of the working tree of $1 to $2 (run through `run`, so it is printed
# under --dry_run). In a git checkout: tracked and untracked-but-not-ignored files that exist.
tar_working_tree() {
  local src=$1 out=$2
  if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (
      cd "$src"
      git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
          if [[ -e $f ]]; then printf '%s\0' "$f"; fi
        done |
        COPYFILE_DISABLE=1 tar -czf "$out" --null -T -
    )
  else
    COPYFILE_DISABLE=1 tar -czf "$out" -C "$src" --exclude=.git --exclude=.venv \
      --exclude=__pycache__ --exclude='*.egg-info' .
  fi
}

SRC=$REMOTE_SRC
VENV=$REMOTE_VENV
if [[ -n $LOCAL_SRC ]]; then
  TARBALL="${TMPDIR:-/tmp}/npp_jax_src.$$.tar.gz"
  if ((!DRY_RUN)); then
    trap 'rm -f "$TARBALL"' EXIT
  fi
  run tar_working_tree "$LOCAL_SRC" "$TARBALL"
  gcloud_tpus tpu-vm scp "$TARBALL" "$NAME:npp_jax_src.tar.gz" --worker=all
  FETCH_SOURCES="rm -rf \"$SRC\"
mkdir -p \"$SRC\"
tar -xzf \"\$HOME/npp_jax_src.tar.gz\" -C \"$SRC\"
rm -f \"\$HOME/npp_jax_src.tar.gz\""
else
  QREPO=$(shquote "$REPO")
  QREF=$(shquote "${REF:-HEAD}")
  FETCH_SOURCES="if [ ! -d \"$SRC/.git\" ]; then
  rm -rf \"$SRC\"
  git clone -q $QREPO \"$SRC\"
fi
cd \"$SRC\"
git remote set-url origin $QREPO
git fetch -q origin $QREF
git checkout -q --force --detach FETCH_HEAD"
fi

GET_WHEELS=""
PIP_SOURCE=""
if [[ -n $WHEELHOUSE ]]; then  # the TPU VM image has gcloud, which reaches GCS without internet.
  WHEELS='$HOME/npp_jax_wheels'
  GET_WHEELS="rm -rf \"$WHEELS\"
mkdir -p \"$WHEELS\"
gcloud storage cp $(shquote "${WHEELHOUSE%/}/*") \"$WHEELS/\"
"
  PIP_SOURCE="--no-index --find-links=\"$WHEELS\" "
fi
APT="sudo apt-get -q -y -o DPkg::Lock::Timeout=600"
REMOTE_SCRIPT="set -eu
$FETCH_SOURCES
if ! command -v $PYTHON >/dev/null 2>&1; then
  $APT update
  $APT install $PYTHON $PYTHON-venv
fi
if [ ! -x \"$VENV/bin/$PYTHON\" ]; then
  rm -rf \"$VENV\"
  $PYTHON -m venv \"$VENV\"
fi
cd \"$SRC\"
$GET_WHEELS\"$VENV/bin/python\" -m pip install -q $PIP_SOURCE--upgrade pip
\"$VENV/bin/python\" -m pip install -q $PIP_SOURCE-e \".[tpu]\"
\"$VENV/bin/python\" -c \"import npp_jax\"
echo \"\$(hostname): npp_jax installed from $SRC into $VENV\""

on_workers all "$REMOTE_SCRIPT"
