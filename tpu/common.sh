# shellcheck shell=bash
# Sourced by the tpu/*.sh scripts: the common flags, usage errors, and `run`, which only prints under --dry-run.
# Each script defines `usage` and `script_flag FLAG` (returns 1 for a flag it does not know); a script that
# takes arguments after `--` also defines `extra_args ARGS...`. Kept to bash 3.2 (macOS) features.

TPU_NAME=${TPU_NAME:-}
TPU_ZONE=${TPU_ZONE:-}
TPU_PROJECT=${TPU_PROJECT:-}
DRY_RUN=0

common_flags_help() {
  cat <<'EOF'
Common flags (a value always follows '='):
  --name=NAME        the TPU VM or pod slice (default: $TPU_NAME)
  --zone=ZONE        e.g. us-east5-a (default: $TPU_ZONE)
  --project=PROJECT  optional (default: $TPU_PROJECT, else gcloud's configured project)
  --dry-run          print the commands, one per line, and run nothing
  --help
EOF
}

usage_error() {
  echo "$(basename "$0"): error: $1" >&2
  echo "run '$0 --help' for usage" >&2
  exit 2
}

parse_flags() {
  while (($#)); do
    case $1 in
      --name=*) TPU_NAME=${1#*=} ;;
      --zone=*) TPU_ZONE=${1#*=} ;;
      --project=*) TPU_PROJECT=${1#*=} ;;
      --name | --zone | --project) usage_error "$1 needs a value: $1=VALUE" ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      --)
        declare -F extra_args >/dev/null || usage_error "no arguments are taken after --"
        shift
        extra_args "$@"
        return ;;
      *) script_flag "$1" || usage_error "unknown flag: $1" ;;
    esac
    shift
  done
}

# require FLAG VALUE [ENV_VAR]
require() {
  [[ -n $2 ]] || usage_error "missing $1${3:+ (or set $3)}"
}

require_tpu() {
  require --name "$TPU_NAME" TPU_NAME
  require --zone "$TPU_ZONE" TPU_ZONE
}

# One word for a shell command line: as is when that is safe, else in single quotes (--flag='value').
quote() {
  if [[ $1 =~ ^[-A-Za-z0-9_./:@%+,][-A-Za-z0-9_./:@%+,=]*$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^--[a-z][-a-z]*= ]]; then
    printf '%s' "${1%%=*}="
    quote "${1#*=}"
  else
    local escaped=${1//\'/\'\\\'\'} # ' -> '\'' (an assignment: the same in every bash version)
    printf "'%s'" "$escaped"
  fi
}

quote_all() {
  local word line=""
  for word in "$@"; do line+="$(quote "$word") "; done
  printf '%s' "${line% }"
}

run() {
  if ((DRY_RUN)); then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

# gcloud compute tpus tpu-vm VERB ARGS... [--project=PROJECT]
tpu_vm() {
  run gcloud compute tpus tpu-vm "$@" ${TPU_PROJECT:+"--project=$TPU_PROJECT"}
}
