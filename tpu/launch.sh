#!/usr/bin/env bash
# Start experiments.train on every worker of a TPU VM or pod slice at once, detached, logging to a file.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

config=""
workdir=""
python=python3
train_args=()

usage() {
  cat <<EOF
Usage: $0 --name=NAME --zone=ZONE --config=CONFIG --workdir=WORKDIR [--python=PYTHON] [common flags] [-- ARGS...]

On every worker at once, in ~/qwen3vl_jax (see install.sh), start in the background
'PYTHON -m experiments.train --config=CONFIG --workdir=WORKDIR ARGS...', appending its output to
~/qwen3vl_jax/train.log on that worker (see logs.sh). Running it again resumes from WORKDIR's newest checkpoint.
  --config=CONFIG    e.g. configs/qwen3_vl_8b.py:sft
  --workdir=WORKDIR  a gs:// path, so that every host writes to the same checkpoint directory
  --python=PYTHON    the Python install.sh installed into (default python3)
  -- ARGS...         more flags for experiments.train, e.g. --config.optimizer.lr=1e-5

$(common_flags_help)

Example:
  $0 --name=my-tpu --zone=us-east5-a --config=configs/qwen3_vl_2b.py --workdir=gs://my-bucket/runs/2b \\
    --dry-run -- --config.optimizer.lr=1e-5
EOF
}

script_flag() {
  case $1 in
    --config=*) config=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    *) return 1 ;;
  esac
}

extra_args() { train_args=("$@"); }

parse_flags "$@"
require_tpu
require --config "$config"
require --workdir "$workdir"
if [[ $workdir != gs://* ]]; then
  echo "note: --workdir=$workdir is not on GCS: on a pod slice each host would write its own copy" >&2
fi

train="$python -m experiments.train $(quote_all "--config=$config" "--workdir=$workdir" \
  ${train_args[@]+"${train_args[@]}"})"
# JAX_PLATFORMS=tpu: fail rather than fall back to the CPU when the TPU cannot be opened; it also makes the
# trainer call jax.distributed.initialize() (qwen3vl_jax/parallel/multihost.py), which finds the other
# workers from the TPU VM metadata. PYTHONUNBUFFERED=1: stdout reaches the log file line by line.
start="cd qwen3vl_jax && { JAX_PLATFORMS=tpu PYTHONUNBUFFERED=1 nohup $train >>train.log 2>&1 </dev/null & }"
start+=" && echo \"\$(hostname): started pid \$!, log ~/qwen3vl_jax/train.log\""
tpu_vm ssh "$TPU_NAME" --zone="$TPU_ZONE" --worker=all --command="$start"
