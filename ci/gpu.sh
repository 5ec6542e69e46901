#!/usr/bin/env bash
# The GPU tier: run on any machine with a CUDA GPU (torch with CUDA, transformers installed).
#   bash ci/gpu.sh            # GPU tests + the accelerator contract suite selecting cuda
# NVLink multicast stays off in every process (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device: the GPU tier needs one"; print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__, "nccl", torch.cuda.nccl.version())'
XTP_CI_ACCELERATOR=cuda python3 -m pytest -q -rs tests/accelerators/test_accel_contract.py
python3 -m pytest -q -rs -m gpu tests/gpu/test_gpu_tier.py tests/loading/test_load_gpu.py "$@"
