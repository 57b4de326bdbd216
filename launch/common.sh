# shellcheck shell=bash disable=SC2034,SC2016
# (SC2034: globals read by the scripts that source this; SC2016: $HOME must expand remotely.)
# Shared by the launch/ scripts (sourced, never run): flag parsing, input checks, the dry-run
# aware `run` helper, the gcloud command prefix and the paths every worker uses.
#
# A script sets PROG and USAGE, sources this file, parses its own flags and hands the rest to
# `common_flag`. Every command with a side effect (gcloud, a local tarball) goes through `run`,
# so `--dry_run` prints it, shell-quoted and copy-pasteable, on stdout instead of running it.

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)

# Paths on every worker. Single-quoted on purpose: $HOME expands on the worker, not here.
REMOTE_SRC='$HOME/npp_jax'             # the checkout (git clone or unpacked tarball)
REMOTE_VENV='$HOME/npp_jax_venv'       # outside the checkout, so re-syncing sources keeps it
REMOTE_LOGS='$HOME/npp_jax_logs'
REMOTE_PIDFILE="$REMOTE_LOGS/run.pid"   # the one run (train, sample or extract) of a worker
# Worker-side test that pid $1 is still our run (a stale pid file may name a reused pid).
REMOTE_ALIVE='alive() { grep -qaE "npp_jax[.](main|sample|extract_codes)" "/proc/$1/cmdline" 2>/dev/null; }'

DRY_RUN=0
NAME=""
ZONE=""
PROJECT=""

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf 'Run "%s --help" for usage.\n' "$PROG" >&2
  exit 2
}

note() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# Prints $1 quoted for a POSIX shell: bare when it is safe, else in single quotes (a
# --flag=value keeps its "--flag=" outside the quotes, which reads better and means the same).
shquote() {
  local s=$1 q="'\\''"
  if [[ $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    s=${BASH_REMATCH[2]}
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${s//\'/$q}"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

# Runs "$@", or with --dry_run prints it ("+ cmd args", one command per "+ ") and runs nothing.
run() {
  local line="+" arg
  for arg in "$@"; do
    line+=" $(shquote "$arg")"
  done
  if ((DRY_RUN)); then
    printf '%s\n' "$line"
  else
    printf '%s\n' "$line" >&2
    "$@"
  fi
}

# `gcloud compute tpus GROUP VERB POSITIONALS... --zone=Z [--project=P] FLAGS...`, through `run`.
gcloud_tpus() {
  local args=(gcloud compute tpus "$1" "$2") where=("--zone=$ZONE")
  shift 2
  if [[ -n $PROJECT ]]; then
    where+=("--project=$PROJECT")
  fi
  while (($#)) && [[ $1 != --* ]]; do
    args+=("$1")
    shift
  done
  run "${args[@]}" "${where[@]}" "$@"
}

# Runs the shell script $2 on worker(s) $1 ("all" or an index) of TPU $NAME.
on_workers() {
  gcloud_tpus tpu-vm ssh "$NAME" "--worker=$1" "--command=$2"
}

# Reads the value of a flag given as "--flag value" or "--flag=value" into FLAG_VALUE and the
# number of arguments it used into FLAG_SHIFT. Call as `flag_value "$@"`.
flag_value() {
  if [[ $1 == *=* ]]; then
    FLAG_VALUE=${1#*=}
    FLAG_SHIFT=1
  elif (($# >= 2)) && [[ $2 != --* ]]; then
    FLAG_VALUE=$2
    FLAG_SHIFT=2
  else
    die "flag $1 needs a value"
  fi
  [[ -n $FLAG_VALUE ]] || die "flag ${1%%=*} needs a non-empty value"
}

# Parses one flag shared by every script (or the TPU name) at the head of "$@"; sets FLAG_SHIFT.
common_flag() {
  case "$1" in
    --zone | --zone=*) flag_value "$@"; ZONE=$FLAG_VALUE ;;
    --project | --project=*) flag_value "$@"; PROJECT=$FLAG_VALUE ;;
    --dry_run | --dry-run) DRY_RUN=1; FLAG_SHIFT=1 ;;
    -h | --help) printf '%s\n' "$USAGE"; exit 0 ;;
    -*) die "unknown flag: $1" ;;
    *)
      [[ -z $NAME ]] || die "unexpected argument '$1' (the TPU name is already '$NAME')"
      NAME=$1
      FLAG_SHIFT=1
      ;;
  esac
}

# Checks the TPU name and zone every script needs.
require_name_and_zone() {
  [[ -n $NAME ]] || die "missing the TPU name (first positional argument)"
  [[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "bad TPU name '$NAME': use lowercase letters, digits and '-', starting with a letter"
  [[ -n $ZONE ]] || die "missing --zone (e.g. --zone us-central2-b)"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    die "bad --zone '$ZONE' (expected e.g. us-central2-b)"
}

# Prints the module that run.sh --cli $1 starts (nothing for an unknown CLI); a run's log is
# $REMOTE_LOGS/$1.log on each worker. (A function, not an associative array: macOS bash 3.2.)
cli_module() {
  case "$1" in
    train) printf npp_jax.main ;;
    sample) printf npp_jax.sample ;;
    extract) printf npp_jax.extract_codes ;;
  esac
}

# Prints the value of flag $1 among the arguments after it ("--flag=value" or "--flag value"),
# or nothing when it is not there.
arg_value() {
  local name=$1
  shift
  while (($#)); do
    case "$1" in
      "$name="*) printf '%s' "${1#*=}"; return ;;
      "$name") printf '%s' "${2:-}"; return ;;
    esac
    shift
  done
}

# Checks a --worker value: "all" or a worker index.
require_worker() {
  [[ $1 == all || $1 =~ ^[0-9]+$ ]] || die "bad --worker '$1' (expected 'all' or a worker index)"
}
