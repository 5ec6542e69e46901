#!/usr/bin/env bash
# Reproducible environment for the benchmark peers (DeepSpeed AutoTP; transformers is shared).
#
# A separate venv that *reuses* the system torch (--system-site-packages), so the peers run on
# exactly the torch/transformers that xtp uses. xtp itself never depends on these packages.
# The script refuses to continue if pip would install or replace torch.
#
#   bash bench/setup_peers.sh [VENV]
#   xtp bench llama-1b --tp 1,2 --vs deepspeed,transformers --python VENV/bin/python
#
# VENV: the argument, else $XTP_PEERS_VENV, else .venv-peers in the repository root (ignored by
# git). Running the script again reuses an existing VENV.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-${XTP_PEERS_VENV:-$ROOT/.venv-peers}}
DEEPSPEED_SPEC=${DEEPSPEED_SPEC:-deepspeed==0.19.8}
ACCELERATE_SPEC=${ACCELERATE_SPEC:-accelerate==1.15.0}
PY=${PYTHON:-python3}

"$PY" -c "import torch" || { echo "setup_peers: the system python has no torch" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
PIP="$VENV/bin/pip"

# DS_ACCELERATOR=cpu: DeepSpeed's setup/JIT builders target the CPU accelerator (shm all-reduce).
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0
# the no-isolation build below needs the build tools in the venv itself
"$PIP" install --quiet "setuptools>=69" wheel
# accelerate: transformers needs it for tp_plan="auto" with more than one rank;
# matplotlib, psutil: xtp's optional 'bench' extra (--plot)
PKGS=("$DEEPSPEED_SPEC" "$ACCELERATE_SPEC" "matplotlib>=3.7" "psutil>=5.9")
plan=$("$PIP" install --dry-run --no-build-isolation "${PKGS[@]}" 2>&1 | tail -n 1) || {
    echo "setup_peers: pip --dry-run failed: $plan" >&2; exit 1; }
echo "setup_peers: $plan"
if echo "$plan" | grep -Eq '(^| )torch-[0-9]'; then
    echo "setup_peers: pip would install another torch; stop (pin a deepspeed that accepts" \
         "$("$PY" -c 'import torch; print(torch.__version__)'))" >&2
    exit 1
fi
# --no-build-isolation: the build sees the system torch instead of downloading one.
"$PIP" install --no-build-isolation "${PKGS[@]}"
"$VENV/bin/python" - <<'PY'
import accelerate, deepspeed, torch, transformers
print(f"setup_peers: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"deepspeed {deepspeed.__version__}, accelerate {accelerate.__version__}")
PY
echo "setup_peers: ready; pass --python $VENV/bin/python to xtp bench"
