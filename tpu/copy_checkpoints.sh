#!/usr/bin/env bash
# Copy a training workdir (checkpoints, metrics, the HF export in hf/) to the local machine.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

workdir=""
dest=.
hf_only=0

usage() {
  cat <<EOF
Usage: $0 --workdir=WORKDIR [--dest=DIR] [--hf] [--name=NAME --zone=ZONE] [common flags]

Copy WORKDIR into DIR (as DIR/<last part of WORKDIR>, or DIR/hf with --hf): with 'gcloud storage cp -r'
when WORKDIR is a gs:// path, else from worker 0 over scp (then --name and --zone are needed; a relative
WORKDIR is taken inside ~/qwen3vl_jax, where launch.sh runs the trainer).
  --workdir=WORKDIR  the --workdir given to launch.sh
  --dest=DIR         an existing local directory (default: the current one)
  --hf               only the exported HF checkpoint, WORKDIR/hf

$(common_flags_help)

Example:
  $0 --workdir=gs://my-bucket/runs/2b --hf --dest=/tmp --dry-run
EOF
}

script_flag() {
  case $1 in
    --workdir=*) workdir=${1#*=} ;;
    --dest=*) dest=${1#*=} ;;
    --hf) hf_only=1 ;;
    *) return 1 ;;
  esac
}

parse_flags "$@"
require --workdir "$workdir"
[[ -d $dest ]] || usage_error "--dest=$dest is not a directory"
while [[ $workdir == */ ]]; do workdir=${workdir%/}; done
source_dir=$workdir
if ((hf_only)); then source_dir+=/hf; fi

if [[ $workdir == gs://* ]]; then
  run gcloud storage cp -r "$source_dir" "$dest" ${TPU_PROJECT:+"--project=$TPU_PROJECT"}
else
  require_tpu
  [[ $source_dir == /* || $source_dir == "~"* ]] || source_dir=qwen3vl_jax/$source_dir
  tpu_vm scp "$TPU_NAME:$source_dir" "$dest" --zone="$TPU_ZONE" --worker=0 --recurse
fi
