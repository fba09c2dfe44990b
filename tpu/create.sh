#!/usr/bin/env bash
# Create a TPU VM or pod slice.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

accelerator_type=v5p-8
runtime_version=""
spot=0

usage() {
  cat <<EOF
Usage: $0 --name=NAME --zone=ZONE [--accelerator-type=TYPE] [--version=RUNTIME] [--spot] [common flags]

Create a TPU VM or pod slice (gcloud compute tpus tpu-vm create).
  --accelerator-type=TYPE  default v5p-8 (4 chips, one host); v5p-N has N/2 chips on N/8 hosts
  --version=RUNTIME        TPU software version; default by type: v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e,
                           v5litepod v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base
  --spot                   a Spot VM: much cheaper, can be preempted at any time

$(common_flags_help)

Example:
  $0 --name=my-tpu --zone=us-east5-a --accelerator-type=v5p-16 --dry-run
EOF
}

script_flag() {
  case $1 in
    --accelerator-type=*) accelerator_type=${1#*=} ;;
    --version=*) runtime_version=${1#*=} ;;
    --spot) spot=1 ;;
    *) return 1 ;;
  esac
}

default_runtime_version() {
  case $1 in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) usage_error "no default --version for --accelerator-type=$1; pass --version=RUNTIME" ;;
  esac
}

parse_flags "$@"
require_tpu
[[ -n $runtime_version ]] || runtime_version=$(default_runtime_version "$accelerator_type")

spot_flag=()
if ((spot)); then spot_flag=(--spot); fi
tpu_vm create "$TPU_NAME" --zone="$TPU_ZONE" --accelerator-type="$accelerator_type" \
  --version="$runtime_version" ${spot_flag[@]+"${spot_flag[@]}"}
