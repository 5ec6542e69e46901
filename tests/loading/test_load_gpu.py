"""GPU tier of loading (marker ``gpu``; ``bash ci/gpu.sh`` or ``pytest -m gpu``): checkpoints
read straight onto a CUDA device. Skipped, with the reason, where torch sees no CUDA device.

At tp 1 over NCCL, and at tp 2 with two ranks sharing one GPU over ``XTP_DIST_BACKEND=gloo``
(placement and sharding, not speed): ``from_pretrained`` equals ``shard()`` of the normally
loaded model on the GPU, tensor for tensor; every tensor is on the GPU; the device memory a
load allocates is this rank's tensors (plus at most one tensor in flight).
"""

from __future__ import annotations

import pytest
import torch

from load_worker import gpu_load, save_case
from ranks import spawn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="GPU tier: torch sees no CUDA device (torch.cuda.is_available() "
                       "is False)"),
]

CASES = ["llama", "qwen2_moe", "gpt2", "t5"]
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "XTP_ACCELERATOR": "cuda"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("tp,backend", [(1, "nccl"), (2, "gloo")])
def test_from_pretrained_onto_gpu(tmp_path, case_id, dtype, tp, backend):
    folder = save_case(case_id, tmp_path / "ckpt")
    env = dict(NVLS_OFF, **({"XTP_DIST_BACKEND": "gloo"} if backend == "gloo" else {}))
    results = spawn(gpu_load, tp, args=(case_id, str(folder), tp, dtype), env=env)
    for rank, r in enumerate(results):
        assert not r["diffs"], f"rank {rank}: {r['diffs'][:5]}"
        assert r["rel_err"] <= 1e-6, f"rank {rank}: {r['rel_err']:.2e}"
        assert r["devices"] == ["cuda:0"], r["devices"]
        assert not r["whole_sharded"], r["whole_sharded"]
        assert r["cuda_held"] >= r["model_bytes"], (r["cuda_held"], r["model_bytes"])
        largest = max(r["model_bytes"] // 4, 1 << 20)
        assert r["cuda_peak"] <= r["model_bytes"] + largest, (r["cuda_peak"], r["model_bytes"])
