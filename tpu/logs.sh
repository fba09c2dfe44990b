#!/usr/bin/env bash
# Show the training log that launch.sh writes on each worker.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

worker=0
lines=100
follow=0

usage() {
  cat <<EOF
Usage: $0 --name=NAME --zone=ZONE [--worker=N|all] [--lines=N] [--follow] [common flags]

Print the end of ~/qwen3vl_jax/train.log on a worker.
  --worker=N|all  default 0, the only one with the progress bar; all: every worker, lines interleaved
  --lines=N       how many lines from the end (default 100)
  --follow        keep printing new lines (tail -F) until Ctrl-C

$(common_flags_help)

Example:
  $0 --name=my-tpu --zone=us-east5-a --follow
EOF
}

script_flag() {
  case $1 in
    --worker=*) worker=${1#*=} ;;
    --lines=*) lines=${1#*=} ;;
    --follow) follow=1 ;;
    *) return 1 ;;
  esac
}

parse_flags "$@"
require_tpu
[[ $worker == all || $worker =~ ^[0-9]+$ ]] || usage_error "--worker must be a number or all, not $worker"
[[ $lines =~ ^[0-9]+$ ]] || usage_error "--lines must be a number, not $lines"

tail_log="tail -n $lines"
if ((follow)); then tail_log+=" -F"; fi
tpu_vm ssh "$TPU_NAME" --zone="$TPU_ZONE" --worker="$worker" --command="$tail_log qwen3vl_jax/train.log"
