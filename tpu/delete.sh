#!/usr/bin/env bash
# Delete a TPU VM or pod slice, without asking.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $0 --name=NAME --zone=ZONE [common flags]

Delete the TPU VM or pod slice NAME, without a confirmation prompt. Its disks go with it: copy what you
need first (copy_checkpoints.sh; a gs:// workdir stays where it is).

$(common_flags_help)

Example:
  $0 --name=my-tpu --zone=us-east5-a --dry-run
EOF
}

script_flag() { return 1; }

parse_flags "$@"
require_tpu
tpu_vm delete "$TPU_NAME" --zone="$TPU_ZONE" --quiet
