#!/usr/bin/env bash
# Run the CPU-only tox matrix (tox.ini), all of it but `py`: .ci/run runs that tier directly
# as README.md's test command. Exits non-zero when any env fails (each one still runs).
#
#   bash ci/matrix.sh                 # tf4, select-cpu/cuda/xpu/hpu, lint, wheel
#   bash ci/matrix.sh -e lint,wheel   # a subset (extra arguments go to `tox run`)
set -euo pipefail
cd "$(dirname "$0")/.."

ENVS="tf4,select-cpu,select-cuda,select-xpu,select-hpu,lint,wheel"
if [[ "${1:-}" == "-e" && -n "${2:-}" ]]; then
    ENVS="$2"
    shift 2
fi

start=$SECONDS
status=0
python -m tox run -e "$ENVS" "$@" || status=$?
echo "ci/matrix.sh: tox envs $ENVS finished in $((SECONDS - start)) s with status $status"
exit "$status"
