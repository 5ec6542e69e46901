"""Inference packing (``xtp.pack_for_inference``; on CPU oneDNN's blocked layout).

Unit tests of the CPU packer, then real sharded models over gloo at tp 2: outputs equal the
unsharded model's (fp32: the parity bar 1e-5; bf16: close to the dense sharded model), greedy
tokens equal, ``state_dict`` and ``unpack`` bit for bit, and typed errors where dense weights
are needed (saving, a forward that needs gradients).
"""

from __future__ import annotations

import pytest
import torch

from parity_worker import packed_parity
from xtp.accelerators.cpu import gemv as cpu_gemv
from xtp.accelerators.cpu.gemv import Bf16GemvLinear, GemvLinear, kernel_isa, unavailable_reason
from xtp.accelerators.cpu.packed_linear import (
    MIN_BYTES,
    PACKABLE_DTYPES,
    OneDNNPackedLinear,
    onednn_available,
    pack_cpu_linear,
)
from xtp.accelerators.devices.cpu import CpuAccelerator
from xtp.accelerators.env import ENV_CPU_PACK as ENV
from xtp.accelerators.errors import AcceleratorError

needs_onednn = pytest.mark.skipif(not onednn_available(),
                                  reason="this torch build has no oneDNN (torch.ops.mkldnn)")
needs_gemv = pytest.mark.skipif(not kernel_isa(), reason=f"no GEMV kernel: {unavailable_reason()}")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_pack_matches_linear_and_unpacks_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 256, generator=g).to(dtype)
    b = torch.randn(300, generator=g).to(dtype)
    x = torch.randn(2, 3, 256, generator=g).to(dtype)
    packed = pack_cpu_linear(w, min_bytes=0, dtypes=PACKABLE_DTYPES)
    assert packed is not None and packed.shape == w.shape and packed.dtype == dtype
    assert torch.equal(packed.unpack(), w)
    want = torch.nn.functional.linear(x, w, b)
    got = packed.matmul(x, b)
    assert got.shape == (2, 3, 300)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((got - want).float().norm() / want.float().norm()) <= tol
    xt = x.transpose(0, 1)  # a non-contiguous input
    assert torch.allclose(packed.matmul(xt).float(), torch.nn.functional.linear(xt, w).float(),
                          rtol=tol, atol=tol)


@needs_onednn
def test_cpu_pack_respects_size_switch_and_dtype(monkeypatch):
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    assert pack_cpu_linear(w) is None  # 8 KiB < MIN_BYTES: the packed call would be slower
    assert MIN_BYTES == 1 << 20
    threads = torch.get_num_threads()
    try:  # bf16: the kernel's layout where it is built, for a rank computing on one thread
        torch.set_num_threads(1)
        default_bf16 = pack_cpu_linear(w, min_bytes=0)
        assert isinstance(default_bf16, Bf16GemvLinear if kernel_isa() else OneDNNPackedLinear)
        assert torch.equal(default_bf16.unpack(), w)
        torch.set_num_threads(2)  # several threads per rank, products not on torch's team:
        monkeypatch.setattr(cpu_gemv, "team_serves_bf16", lambda: False)  # oneDNN's matmul
        assert isinstance(pack_cpu_linear(w, min_bytes=0), OneDNNPackedLinear)
        monkeypatch.setattr(cpu_gemv, "team_serves_bf16", lambda: True)  # on it: the kernel
        assert isinstance(pack_cpu_linear(w, min_bytes=0), type(default_bf16))
        monkeypatch.setattr(cpu_gemv, "team_serves_bf16", lambda: False)
        monkeypatch.setenv("XTP_CPU_GEMV_THREADS", "2")  # asked: the kernel splits the product
        assert isinstance(pack_cpu_linear(w, min_bytes=0), type(default_bf16))
    finally:
        torch.set_num_threads(threads)
    assert pack_cpu_linear(w.to(torch.int32), min_bytes=0) is None
    # fp32: xtp's GEMV kernel by default (where built), oneDNN when asked for by dtype
    assert isinstance(pack_cpu_linear(w.float(), min_bytes=0, dtypes=(torch.float32,)),
                      OneDNNPackedLinear)
    assert pack_cpu_linear(w, min_bytes=0, dtypes=(torch.float32,)) is None
    assert isinstance(CpuAccelerator(pack_min_bytes=0, pack_dtypes=PACKABLE_DTYPES)
                      .pack_linear_weight(w.float()), OneDNNPackedLinear)
    default_fp32 = pack_cpu_linear(w.float(), min_bytes=0)
    if kernel_isa():
        assert isinstance(default_fp32, GemvLinear)
        assert isinstance(CpuAccelerator(pack_min_bytes=0).pack_linear_weight(w.float()),
                          GemvLinear)
        assert pack_cpu_linear(w.float().t(), min_bytes=0) is None  # not row-major: dense
    else:
        assert default_fp32 is None
    half = pack_cpu_linear(w.half(), min_bytes=0)  # only where the CPU has fp16 instructions
    if half is not None:
        assert torch.equal(half.unpack(), w.half())
    monkeypatch.setenv(ENV, "all")
    assert isinstance(pack_cpu_linear(w.float(), min_bytes=0), OneDNNPackedLinear)
    monkeypatch.setenv(ENV, "0")
    assert pack_cpu_linear(w, min_bytes=0) is None
    assert CpuAccelerator(pack_min_bytes=0, pack_dtypes=PACKABLE_DTYPES).pack_linear_weight(
        w.float()) is None  # off means off, whatever the accelerator was built with


def test_cpu_pack_rejects_an_unknown_switch_value(monkeypatch):
    monkeypatch.setenv(ENV, "fp32")
    with pytest.raises(AcceleratorError) as err:
        pack_cpu_linear(torch.randn(8, 8, dtype=torch.bfloat16), min_bytes=0)
    assert str(err.value) == ("XTP_CPU_PACK='fp32' is not understood; use 1 (the default: fp32 "
                              "and bf16 through xtp's GEMV kernel, fp16 packed for oneDNN), all "
                              "(every dtype packed for oneDNN), kernel (bf16 through the "
                              "kernel on AMX CPUs too), kernel-rows (the same with bf16 weights "
                              "kept as plain rows) or 0 (no packing)")


@needs_onednn
def test_packed_matmul_rejects_other_dtype_and_device():
    packed = pack_cpu_linear(torch.randn(8, 8), min_bytes=0, dtypes=PACKABLE_DTYPES)
    with pytest.raises(TypeError, match="a packed model cannot be moved or cast"):
        packed.matmul(torch.randn(1, 8, dtype=torch.bfloat16))


def test_accelerators_without_a_packed_layout_keep_weights_dense():
    from xtp.accelerators.devices.cuda import CudaAccelerator

    assert CudaAccelerator().pack_linear_weight(torch.randn(2048, 2048)) is None


def test_pack_for_inference_needs_a_sharded_model():
    import xtp

    with pytest.raises(xtp.XtpError, match="needs a model sharded by xtp.shard"):
        xtp.pack_for_inference(torch.nn.Linear(4, 4))


PACKED_CASES = ["llama", "qwen2", "phi3", "falcon", "mixtral", "gpt2", "bert", "t5"]
#: cases whose layers stay dense: only plain nn.Linear computing F.linear is packed
DENSE = {"gpt2": "Conv1D is not nn.Linear", "falcon": "FalconLinear has its own forward"}


@needs_onednn
@pytest.mark.parametrize("case_id", PACKED_CASES)
def test_packed_sharded_model_matches_unsharded(rank_pool, case_id):
    results = rank_pool(2).run(packed_parity, case_id, 2)
    for rank, r in enumerate(results):
        assert (r["packed"] == 0) == (case_id in DENSE), (rank, r["packed"])
        assert r["packed_again"] == 0
        assert r["rel_err"] <= 1e-5, (rank, r["rel_err"])
        assert r.get("tokens_equal", True), rank
        assert r["state_equal"] == [], r["state_equal"][:5]
        assert r["unpacked"] == r["packed"]
        assert r["unpacked_state_equal"] == [], r["unpacked_state_equal"][:5]
        assert r["flags_restored"] and r["unpacked_equal_dense"]
        if r["packed"]:
            assert r["grad_off"]
            assert r["save_error"].startswith("xtp.save_sharded needs the dense weights, but this "
                                              "model's linear weights are packed for inference")
            assert r["save_error"].endswith("call xtp.unpack(model) first")
            assert r["save_left_nothing"]
            assert r["grad_error"].startswith("a forward that needs gradients needs the dense")
            assert r["load_error"].startswith("load_state_dict needs the dense weights")
            assert r["state_after_failed_load"] == [], r["state_after_failed_load"][:5]
        else:
            assert r["save_error"] is None and r["grad_error"] is None
            assert r["load_error"] is None


@needs_gemv
@pytest.mark.parametrize("case_id", ["llama", "mixtral", "t5"])
def test_gemv_kernel_sharded_model_matches_unsharded(rank_pool, case_id):
    """The default fp32 layout: one-token products (greedy decode) through xtp's GEMV kernel."""
    for rank, r in enumerate(rank_pool(2).run(packed_parity, case_id, 2, "float32", "default")):
        assert r["packed"] > 0 and r["packed_again"] == 0
        assert r["gemv_calls"] > 0, rank  # generate's decode steps went to the kernel
        assert r["rel_err"] <= 1e-5, (rank, r["rel_err"])
        assert r["tokens_equal"], rank
        assert r["state_equal"] == [] and r["unpacked_state_equal"] == []
        assert r["unpacked"] == r["packed"] and r["unpacked_equal_dense"]
        assert r["save_error"].endswith("call xtp.unpack(model) first")


@needs_gemv
@pytest.mark.parametrize("case_id", ["llama", "mixtral"])
def test_gemv_kernel_bf16_sharded_model_close_to_dense_sharded(rank_pool, case_id):
    """bf16's default layout: decode steps through the kernel's blocked bf16 layout."""
    for rank, r in enumerate(rank_pool(2).run(packed_parity, case_id, 2, "bfloat16", "default")):
        assert r["packed"] > 0 and r["gemv_calls"] > 0, (rank, r["packed"], r["gemv_calls"])
        assert r["rel_err_vs_dense"] <= 1e-2, (rank, r["rel_err_vs_dense"])
        assert r["state_equal"] == [] and r["unpacked_state_equal"] == []
        assert r["unpacked"] == r["packed"] and r["unpacked_equal_dense"]


@needs_onednn
@pytest.mark.parametrize("case_id", ["llama", "qwen2"])
def test_packed_bf16_close_to_dense_sharded(rank_pool, case_id):
    for r in rank_pool(2).run(packed_parity, case_id, 2, "bfloat16"):
        assert r["packed"] > 0
        assert r["rel_err_vs_dense"] <= 1e-2, r["rel_err_vs_dense"]
        assert r["state_equal"] == [] and r["unpacked_state_equal"] == []
        assert r["unpacked_equal_dense"]


def test_bf16_stays_with_onednn_on_cpus_with_amx(monkeypatch):
    """AMX bf16 tiles (oneDNN uses them) outran the kernel on one core there: bf16 of
    one-thread ranks keeps oneDNN's layout by default; fp32 still goes to the kernel; ``all``
    and ``0`` are unchanged (ranks of several threads: test_openmp_team)."""
    from xtp.accelerators.cpu import packed_linear as cpl

    monkeypatch.setattr(cpl.torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(cpl, "cpu_has_amx_bf16", lambda: True)
    assert cpl.env_layouts() == {torch.bfloat16: cpl.ONEDNN, torch.float16: cpl.ONEDNN,
                                 torch.float32: cpl.GEMV}
    monkeypatch.setattr(cpl, "cpu_has_amx_bf16", lambda: False)
    assert cpl.env_layouts() == cpl.DEFAULT_LAYOUTS
    monkeypatch.setenv(ENV, "all")
    assert set(cpl.env_layouts().values()) == {cpl.ONEDNN}


def test_amx_is_read_from_the_cpu_flags():
    from xtp.accelerators.cpu.packed_linear import cpu_has_amx_bf16

    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    assert cpu_has_amx_bf16() == ("amx_bf16" in flags)
