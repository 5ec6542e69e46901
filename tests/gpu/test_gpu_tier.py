"""GPU tier: xtp on a real CUDA device (marker ``gpu``; run with ``bash ci/gpu.sh``).

Skipped, with the reason shown by ``-ra``, wherever torch sees no CUDA device. What runs:
NCCL process-group setup through xtp's own init path; the parity suite with the model on the
GPU at tp 1 over NCCL, at tp 2 with two ranks sharing one GPU over ``XTP_DIST_BACKEND=gloo``
(placement and sharding, not speed), and at tp 2, 4 and 8 over NCCL with a GPU per rank where
the host has that many (skipped with the count otherwise), in fp32 and bf16.

bf16 tolerance: a bf16 model differs from its own fp32 version by rounding alone (8-bit
mantissa, eps 2**-8); a sharded bf16 model sums in a different order, so its error is of the
same size, not zero. The test measures the unsharded bf16 model's error against fp32 (``e0``)
and requires the sharded bf16 model's error against fp32 to stay within ``2 * e0 + 1e-3``:
sharding may not make the rounding error more than twice what bf16 itself costs.
"""

from __future__ import annotations

import pytest
import torch

from ranks import spawn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="GPU tier: torch sees no CUDA device (torch.cuda.is_available() "
                       "is False)"),
]

GPU_CASES = ["llama", "llama_kv1", "llama_6heads_tp4", "phi3", "gpt2", "bloom", "falcon",
             "mixtral", "qwen2_moe", "t5", "bert"]
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def test_nccl_process_group_through_xtp_init():
    from gpu_worker import nccl_init_and_all_reduce

    (r,) = spawn(nccl_init_and_all_reduce, 1, env={**NVLS_OFF, "XTP_ACCELERATOR": "cuda"})
    assert r["backend"] == "nccl"
    assert r["device"] == "cuda:0"
    assert r["value"] == 1.0


def test_two_ranks_share_one_gpu_over_gloo():
    from gpu_worker import nccl_init_and_all_reduce

    env = {**NVLS_OFF, "XTP_ACCELERATOR": "cuda", "XTP_DIST_BACKEND": "gloo"}
    results = spawn(nccl_init_and_all_reduce, 2, env=env)
    assert [r["backend"] for r in results] == ["gloo", "gloo"]
    assert all(r["device"] == "cuda:0" for r in results)
    assert all(r["value"] == 3.0 for r in results)


#: (tp, backend): tp 1 over NCCL; tp 2 with both ranks on one GPU over gloo (runs anywhere with
#: a GPU); tp 2, 4, 8 over NCCL with one GPU per rank, where the host has that many GPUs
TP_BACKENDS = [(1, "nccl"), (2, "gloo"), (2, "nccl"), (4, "nccl"), (8, "nccl")]


def _needs_gpus(tp: int, backend: str) -> None:
    have = torch.cuda.device_count()
    if backend == "nccl" and tp > have:
        pytest.skip(f"tp {tp} over NCCL needs {tp} GPUs; this host has {have}")


def _rank_device(tp: int, backend: str, rank: int) -> str:
    return f"cuda:{rank}" if backend == "nccl" and tp > 1 else "cuda:0"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case_id", GPU_CASES)
@pytest.mark.parametrize("tp,backend", TP_BACKENDS)
def test_parity_on_gpu(case_id, dtype, tp, backend):
    from gpu_worker import gpu_parity

    if case_id == "llama_6heads_tp4" and tp == 1:
        pytest.skip("covered by llama at tp 1")
    _needs_gpus(tp, backend)
    env = {**NVLS_OFF, "XTP_ACCELERATOR": "cuda", "XTP_DIST_BACKEND": backend}
    results = spawn(gpu_parity, tp, args=(case_id, dtype), env=env)
    for rank, r in enumerate(results):
        want = [_rank_device(tp, backend, rank)]
        assert r["param_devices"] == want, f"rank {rank}: parameters on {r['param_devices']}"
        if dtype == "float32":
            assert r["rel_vs_same_dtype"] <= 1e-5, f"rank {rank}: {r}"
            assert r["tokens_equal"], f"rank {rank}: greedy tokens differ"
        else:
            assert r["sharded_vs_fp32"] <= 2 * r["unsharded_vs_fp32"] + 1e-3, f"rank {rank}: {r}"


@pytest.mark.parametrize("tp,backend", TP_BACKENDS)
def test_compiled_sharded_model_on_gpu_is_one_graph_and_matches(tp, backend):
    from gpu_worker import gpu_compiled_parity

    _needs_gpus(tp, backend)
    env = {**NVLS_OFF, "XTP_ACCELERATOR": "cuda", "XTP_DIST_BACKEND": backend}
    for rank, r in enumerate(spawn(gpu_compiled_parity, tp, args=("llama",), env=env,
                                   timeout=900)):
        assert r["device"] == _rank_device(tp, backend, rank), f"rank {rank}: {r}"
        assert r["rel"] <= 1e-5, f"rank {rank}: {r}"


@pytest.mark.parametrize("extra,decode", [((), "compiled, static cache"), (("--eager",), "eager")])
def test_xtp_run_on_cuda_decodes_compiled_by_default_and_matches_unsharded(extra, decode):
    """``xtp run`` on CUDA: compiled static-cache decode unless --eager; the tokens are checked
    against the unsharded model decoded the same way."""
    import os
    import subprocess
    import sys

    env = {**os.environ, **NVLS_OFF, "XTP_ACCELERATOR": "cuda"}
    proc = subprocess.run([sys.executable, "-m", "xtp.cli.main", "run", "--tp", "1",
                           "--max-new-tokens", "24", *extra], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"tokens/s ({decode})" in proc.stdout, proc.stdout
    assert "matches unsharded model: yes" in proc.stdout, proc.stdout
