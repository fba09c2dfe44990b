#!/usr/bin/env bash
# Put the project on every worker of a TPU VM or pod slice, in ~/qwen3vl_jax, and pip-install it there.
set -euo pipefail
# shellcheck source=tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

repo_url=""
repo_ref=""
python=python3

usage() {
  cat <<EOF
Usage: $0 --name=NAME --zone=ZONE [--repo=URL [--ref=REF]] [--python=PYTHON] [common flags]

Put the project in ~/qwen3vl_jax on every worker and install it with
'PYTHON -m pip install -r requirements.txt -r requirements-tpu.txt -e .'.
By default the committed state of this checkout (git archive HEAD: uncommitted changes are left out) is
copied to the workers; with --repo the workers clone URL instead.
  --repo=URL        clone this git URL on the workers (later runs fetch and check out REF again)
  --ref=REF         with --repo: a commit, tag or origin/BRANCH (default origin/HEAD)
  --python=PYTHON   the workers' Python, at least 3.11 (default python3); given to the remote shell as is,
                    so '~/venv/bin/python' works

$(common_flags_help)

Example:
  $0 --name=my-tpu --zone=us-east5-a --dry-run
EOF
}

script_flag() {
  case $1 in
    --repo=*) repo_url=${1#*=} ;;
    --ref=*) repo_ref=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    *) return 1 ;;
  esac
}

parse_flags "$@"
require_tpu
[[ -z $repo_ref || -n $repo_url ]] || usage_error "--ref needs --repo"

pip_install="$python -m pip install -r requirements.txt -r requirements-tpu.txt -e ."
if [[ -n $repo_url ]]; then
  fetch="{ test -d qwen3vl_jax/.git || git clone $(quote "$repo_url") qwen3vl_jax; }"
  fetch+=" && cd qwen3vl_jax && git fetch origin && git checkout --detach $(quote "${repo_ref:-origin/HEAD}")"
else
  repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  archive="${TMPDIR:-/tmp}/qwen3vl_jax-$TPU_NAME.tar.gz"
  run git -C "$repo_root" archive --format=tar.gz --output="$archive" HEAD
  tpu_vm scp "$archive" "$TPU_NAME:qwen3vl_jax.tar.gz" --zone="$TPU_ZONE" --worker=all
  fetch="mkdir -p qwen3vl_jax && tar -xzf qwen3vl_jax.tar.gz -C qwen3vl_jax && cd qwen3vl_jax"
fi
# The remote command starts in the worker's home directory.
tpu_vm ssh "$TPU_NAME" --zone="$TPU_ZONE" --worker=all --command="$fetch && $pip_install"
