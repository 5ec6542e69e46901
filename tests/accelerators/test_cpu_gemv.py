"""xtp's GEMV kernel (``accelerators/csrc/cpu_gemv.c``): fp32 through ``cpu_gemv.GemvLinear``,
bf16 through ``cpu_gemv.Bf16GemvLinear`` and its blocked layout.

Every instruction set the CPU running the tests has (AVX-512 and AVX2 on an AVX-512 machine),
shapes whose rows and columns leave tails, with and without bias, against ``F.linear`` within
fp32 rounding; which calls go to the kernel and which to ``F.linear``; typed errors. Sharded
models decoding through the kernel are in test_packing.py.
"""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from gemv_spy import GemvSpy
from xtp.accelerators.cpu import gemv as cpu_gemv
from xtp.accelerators.cpu.gemv import Bf16GemvLinear, GemvLinear, kernel_isa, unavailable_reason

needs_gemv = pytest.mark.skipif(not kernel_isa(), reason=f"no GEMV kernel: {unavailable_reason()}")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next(x for x in f if x.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                    reason="the kernel is built for x86-64; elsewhere F.linear is the path")
def test_kernel_is_built_and_picks_the_best_instruction_set():
    """An x86-64 Linux install with a C compiler (CI's) must have built the extension."""
    flags = _cpu_flags()
    want = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else ""
    assert unavailable_reason() == ("" if want else "it needs an x86-64 CPU with AVX-512 or "
                                    "AVX2 and FMA; this one has neither")
    assert kernel_isa() == want


def _isas() -> list[str]:
    flags = _cpu_flags()
    return [isa for isa, need in (("avx512", {"avx512f"}), ("avx2", {"avx2", "fma"}))
            if need <= flags]


@pytest.fixture(autouse=True)
def one_thread_rank():
    """A rank computing on one thread (tp ranks sharing a small host's cores), the case the
    kernel serves by default (gemv.MAX_KERNEL_THREADS); tests that need more set them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=_isas() or ["none"])
def isa(request):
    if request.param == "none" or not kernel_isa():
        pytest.skip(f"no GEMV kernel: {unavailable_reason() or 'no AVX2/AVX-512 here'}")
    kernel, before = cpu_gemv._kernel, kernel_isa()
    assert kernel.use(request.param)
    yield request.param
    assert kernel.use(before)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def spy(monkeypatch):
    s = GemvSpy(cpu_gemv._kernel)
    monkeypatch.setattr(cpu_gemv, "_kernel", s)
    return s


@pytest.mark.parametrize("out_f,in_f", [(1, 1), (7, 5), (8, 16), (9, 17), (300, 257),
                                        (64, 2048), (1000, 100), (17, 4099)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_linear(isa, one_thread, spy, out_f, in_f, with_bias):
    g = torch.Generator().manual_seed(out_f * 10007 + in_f)
    w = torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if with_bias else None
    x = torch.randn(1, 1, in_f, generator=g)
    got = GemvLinear(w).matmul(x, b)
    want = F.linear(x, w, b)
    assert spy.calls == 1 and got.shape == want.shape == (1, 1, out_f)
    # fp32 rounding of a sum of in_f products, in another order than MKL's
    bound = 4 * in_f * torch.finfo(torch.float32).eps * (
        (w.abs() * x.reshape(1, -1).abs()).sum(1) + (b.abs() if b is not None else 0))
    assert ((got - want).abs().reshape(-1) <= bound + 1e-30).all()


def test_kernel_is_exact_on_integer_data(isa, one_thread, spy):
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-8, 8, (45, 333), generator=g).float()
    x = torch.randint(-8, 8, (333,), generator=g).float()
    b = torch.randint(-8, 8, (45,), generator=g).float()
    assert torch.equal(GemvLinear(w).matmul(x, b), F.linear(x, w, b))
    assert spy.calls == 1


@needs_gemv
def test_one_row_inputs_of_any_layout_go_to_the_kernel(one_thread, spy):
    w = torch.randn(40, 24)
    lin = GemvLinear(w)
    for x in (torch.randn(24), torch.randn(1, 24), torch.randn(24, 3)[:, 1],  # strided
              torch.randn(1, 1, 24)):
        assert torch.allclose(lin.matmul(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert spy.calls == 4
    assert lin.matmul(torch.randn(1, 24)).shape == (1, 40)


@needs_gemv
def test_profiler_sees_kernel_products_by_name(one_thread):
    """The kernel is no torch op: under torch.profiler its products are named ``xtp::<entry>``
    (so `xtp bench --profile` attributes their time), and outside it nothing is recorded."""
    fp32, bf16 = GemvLinear(torch.randn(40, 64)), Bf16GemvLinear(torch.randn(40, 64).bfloat16())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fp32.matmul(torch.randn(1, 64))
        bf16.matmul(torch.randn(2, 64).bfloat16())
        fp32.matmul(torch.randn(cpu_gemv.MAX_KERNEL_ROWS + 1, 64))  # F.linear: no kernel event
    names = [e.name for e in prof.events()]
    assert names.count("xtp::gemv") == 1 and names.count("xtp::gemv_bf16") == 1


@needs_gemv
def test_other_calls_go_to_linear(one_thread, spy, monkeypatch):
    w = torch.randn(40, 24)
    lin = GemvLinear(w)
    many = torch.randn(cpu_gemv.MAX_KERNEL_ROWS + 1, 24)  # more rows than it serves (prefill)
    assert torch.equal(lin.matmul(many), F.linear(many, w))
    xg = torch.randn(1, 24, requires_grad=True)
    lin.matmul(xg).sum().backward()  # a gradient is recorded: autograd's F.linear
    assert torch.allclose(xg.grad, w.sum(0, keepdim=True), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        lin.matmul(xg)  # no gradient recorded: the kernel
    torch.set_num_threads(2)  # the default: the kernel serves one-thread ranks only
    lin.matmul(torch.randn(1, 24))  # more threads than that: MKL's parallel GEMV
    torch.set_num_threads(1)
    with pytest.raises(RuntimeError, match="same dtype"):  # a bias the kernel cannot read:
        lin.matmul(torch.randn(1, 24), torch.randn(40, dtype=torch.float64))  # F.linear's error
    assert spy.calls == 1


@needs_gemv
def test_unpack_is_the_weight_itself():
    w = torch.randn(16, 8)
    lin = GemvLinear(w)
    assert lin.unpack() is not None and lin.unpack().data_ptr() == w.data_ptr()
    assert lin.shape == w.shape and lin.dtype == torch.float32 and lin.nbytes == 16 * 8 * 4


@needs_gemv
def test_bad_weights_and_inputs_are_refused():
    with pytest.raises(ValueError, match=r"GemvLinear takes a contiguous 2-D float32 CPU "
                                         r"weight, got torch.bfloat16 \(4, 4\) on cpu$"):
        GemvLinear(torch.randn(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"got torch.float32 \(4, 6\) on cpu \(not contiguous\)$"):
        GemvLinear(torch.randn(6, 4).t())
    with pytest.raises(TypeError, match="a packed model cannot be moved or cast"):
        GemvLinear(torch.randn(4, 4)).matmul(torch.randn(1, 4, dtype=torch.float64))


def test_without_the_kernel_nothing_is_wrapped(monkeypatch):
    from xtp.accelerators.cpu.packed_linear import pack_cpu_linear

    monkeypatch.setattr(cpu_gemv, "_WHY", "the compiled kernel is not installed (test)")
    assert pack_cpu_linear(torch.randn(64, 64), min_bytes=0) is None
    with pytest.raises(RuntimeError, match=r"^xtp's GEMV kernel is not available: the compiled "
                                           r"kernel is not installed \(test\)$"):
        GemvLinear(torch.randn(4, 4))


# --- bf16: the kernel's blocked layout ---------------------------------------------------------


@pytest.mark.parametrize("out_f,in_f", [(1, 1), (7, 5), (8, 32), (9, 33), (300, 257),
                                        (64, 2048), (17, 4099)])
def test_bf16_layout_round_trips_bit_for_bit(out_f, in_f):
    w = torch.randn(out_f, in_f).to(torch.bfloat16)
    packed = cpu_gemv.pack_bf16(w)
    assert packed.numel() == -(-out_f // 8) * 8 * (-(-in_f // 32) * 32)
    assert torch.equal(cpu_gemv.unpack_bf16(packed, (out_f, in_f)), w)


@pytest.mark.parametrize("out_f,in_f,rows", [(1, 1, 1), (7, 5, 1), (8, 32, 1), (9, 33, 3),
                                             (300, 257, 1), (64, 2048, 2), (17, 4099, 8),
                                             (1000, 100, 4)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_kernel_matches_linear(isa, spy, out_f, in_f, rows, with_bias):
    g = torch.Generator().manual_seed(out_f * 10007 + in_f + rows)
    w = torch.randn(out_f, in_f, generator=g).to(torch.bfloat16)
    b = torch.randn(out_f, generator=g).to(torch.bfloat16) if with_bias else None
    x = torch.randn(rows, 1, in_f, generator=g).to(torch.bfloat16)
    got = Bf16GemvLinear(w).matmul(x, b)
    assert spy.calls == 1 and got.shape == (rows, 1, out_f) and got.dtype == torch.bfloat16
    # the exact product in fp32, then one rounding to bf16 (half an ulp: 2**-9 relative); the
    # fp32 sums differ from each other by their own rounding only
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    fp32_bound = 4 * in_f * torch.finfo(torch.float32).eps * (
        x.float().abs() @ w.float().abs().T + (0 if b is None else b.float().abs()))
    assert ((got.float() - want).abs() <= want.abs() * 2**-8 + fp32_bound + 1e-30).all()


def test_bf16_kernel_is_exact_on_integer_data(isa, spy):
    g = torch.Generator().manual_seed(2)
    w = torch.randint(-4, 4, (45, 333), generator=g).to(torch.bfloat16)
    x = torch.randint(-4, 4, (2, 333), generator=g).to(torch.bfloat16)
    b = torch.randint(-4, 4, (45,), generator=g).to(torch.bfloat16)
    assert torch.equal(Bf16GemvLinear(w).matmul(x, b), F.linear(x, w, b))
    assert spy.calls == 1


@needs_gemv
def test_bf16_calls_the_kernel_does_not_serve_go_to_linear(spy, monkeypatch):
    w = torch.randn(40, 64).to(torch.bfloat16)
    lin = Bf16GemvLinear(w)
    many = torch.randn(cpu_gemv.MAX_KERNEL_ROWS + 1, 64).to(torch.bfloat16)  # prefill
    assert torch.equal(lin.matmul(many), F.linear(many, w))
    xg = torch.randn(1, 64).to(torch.bfloat16).requires_grad_(True)
    lin.matmul(xg).float().sum().backward()  # a gradient is recorded
    assert xg.grad is not None and xg.grad.shape == (1, 64)
    assert spy.calls == 0
    before, team = torch.get_num_threads(), cpu_gemv.team_mode()
    torch.set_num_threads(2)  # asked for: the kernel serves up to XTP_CPU_GEMV_THREADS
    try:
        monkeypatch.setenv("XTP_CPU_GEMV_THREADS", "1")
        lin.matmul(torch.randn(1, 64).to(torch.bfloat16))
        assert spy.calls == 0
        monkeypatch.setenv("XTP_CPU_GEMV_THREADS", "2")
        lin.matmul(torch.randn(1, 64).to(torch.bfloat16))
        assert spy.calls == 1
        monkeypatch.delenv("XTP_CPU_GEMV_THREADS")  # the default: bf16 on torch's team ...
        lin.matmul(torch.randn(1, 64).to(torch.bfloat16))
        assert spy.calls == 1 + team
        cpu_gemv.set_team_mode(False)  # ... and F.linear where products cannot run on it
        lin.matmul(torch.randn(1, 64).to(torch.bfloat16))
        assert spy.calls == 1 + team
    finally:
        torch.set_num_threads(before)
        cpu_gemv.set_team_mode(team)


@needs_gemv
def test_bf16_bad_weights_and_inputs_are_refused():
    with pytest.raises(ValueError, match=r"^Bf16GemvLinear takes a 2-D bfloat16 CPU weight, got "
                                         r"torch.float32 \(4, 4\) on cpu$"):
        Bf16GemvLinear(torch.randn(4, 4))
    with pytest.raises(TypeError, match="a packed model cannot be moved or cast"):
        Bf16GemvLinear(torch.randn(4, 4).to(torch.bfloat16)).matmul(torch.randn(1, 4))
    lin = Bf16GemvLinear(torch.randn(8, 8).to(torch.bfloat16))
    assert lin.nbytes == 8 * 32 * 2  # the padded layout: 8 rows x 32 columns
