"""xtp's GEMV kernel on bf16 weights kept as plain rows (``Bf16RowsLinear``,
``XTP_CPU_PACK=kernel-rows``): the same sums as on the blocked layout, bit for bit, on both
instruction sets and any thread count; what it refuses; which calls it serves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemv_spy import GemvSpy
from xtp.accelerators.cpu import gemv as cpu_gemv
from xtp.accelerators.cpu import packed_linear
from xtp.accelerators.cpu.gemv import Bf16GemvLinear, Bf16RowsLinear, kernel_isa
from xtp.accelerators.errors import EnvSettingError

pytestmark = pytest.mark.skipif(not kernel_isa(), reason=f"no GEMV kernel: "
                                f"{cpu_gemv.unavailable_reason()}")


def _isas() -> list[str]:
    k, before, found = cpu_gemv._kernel, kernel_isa(), []
    for isa in ("avx512", "avx2"):
        if k is not None and k.use(isa):
            found.append(isa)
    if k is not None:
        k.use(before)
    return found or ["none"]


@pytest.fixture(params=_isas())
def isa(request):
    kernel, before = cpu_gemv._kernel, kernel_isa()
    assert kernel.use(request.param)
    yield request.param
    assert kernel.use(before)


@pytest.fixture
def spy(monkeypatch):
    s = GemvSpy(cpu_gemv._kernel)
    monkeypatch.setattr(cpu_gemv, "_kernel", s)
    return s


@pytest.fixture(autouse=True)
def one_thread_rank():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16])
def test_plain_rows_give_the_blocked_layouts_sums_bit_for_bit(isa, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(72, 160, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 160, generator=g).to(torch.bfloat16)
    b = torch.randn(72, generator=g).to(torch.bfloat16)
    plain, blocked = Bf16RowsLinear(w), Bf16GemvLinear(w)
    assert torch.equal(plain.matmul(x, b), blocked.matmul(x, b))
    assert torch.equal(plain.matmul(x), blocked.matmul(x))
    assert (plain.matmul(x).float() - F.linear(x, w).float()).abs().max() < 0.05


@pytest.mark.parametrize("threads", [1, 3])
def test_plain_rows_are_exact_on_integer_data_on_any_thread_count(isa, threads):
    g = torch.Generator().manual_seed(4)
    w = torch.randint(-4, 4, (512, 256), generator=g).to(torch.bfloat16)
    x = torch.randint(-4, 4, (3, 256), generator=g).to(torch.bfloat16)
    b = torch.randint(-4, 4, (512,), generator=g).to(torch.bfloat16)
    y = torch.empty(3, 512, dtype=torch.bfloat16)
    cpu_gemv._kernel.gemv_bf16_rows(w.data_ptr(), x.data_ptr(), b.data_ptr(), y.data_ptr(),
                                    512, 256, 3, threads)
    assert torch.equal(y, F.linear(x, w, b))


def test_shapes_the_plain_kernel_cannot_read_are_refused():
    w = torch.zeros(8, 40, dtype=torch.bfloat16)
    sig = r"^gemv_bf16_rows\(w, x, b, y, out, in\[, m\[, threads\]\]\)"
    with pytest.raises(ValueError, match=sig + r": in must be a multiple of 32 and out of 8, "
                                               r"got out=8 in=40$"):
        cpu_gemv._kernel.gemv_bf16_rows(w.data_ptr(), w.data_ptr(), None, w.data_ptr(), 8, 40, 1)
    want = (r"^Bf16RowsLinear takes a contiguous 2-D bfloat16 CPU weight with in_features a "
            r"multiple of 32 and out_features of 8, got torch.bfloat16 \(8, 40\) on cpu$")
    with pytest.raises(ValueError, match=want):
        Bf16RowsLinear(w)
    with pytest.raises(ValueError, match=r"got torch.float32 \(8, 32\)"):
        Bf16RowsLinear(torch.zeros(8, 32))


def test_more_rows_than_the_kernel_serves_go_to_linear_on_the_same_weight(spy, monkeypatch):
    w = torch.randn(64, 96).to(torch.bfloat16)
    lin = Bf16RowsLinear(w)
    assert lin.unpack() is not None and lin.unpack().data_ptr() == w.data_ptr()  # no copy
    assert lin.nbytes == w.numel() * 2
    lin.matmul(torch.randn(cpu_gemv.MAX_KERNEL_ROWS, 96).to(torch.bfloat16))
    assert spy.calls == 1
    many = torch.randn(cpu_gemv.MAX_KERNEL_ROWS + 1, 96).to(torch.bfloat16)
    assert torch.equal(lin.matmul(many), F.linear(many, w)) and spy.calls == 1
    monkeypatch.setenv("XTP_CPU_GEMV_ROWS", "4")  # batches of more than 4 rows: F.linear
    five = torch.randn(5, 96).to(torch.bfloat16)
    assert torch.equal(lin.matmul(five), F.linear(five, w)) and spy.calls == 1
    lin.matmul(torch.randn(4, 96).to(torch.bfloat16))
    assert spy.calls == 2
    monkeypatch.setenv("XTP_CPU_GEMV_ROWS", "many")
    with pytest.raises(EnvSettingError, match=r"^XTP_CPU_GEMV_ROWS='many'"):
        lin.matmul(five)


def test_kernel_rows_setting_packs_bf16_as_plain_rows_where_the_shape_fits(monkeypatch):
    monkeypatch.setenv("XTP_CPU_PACK", "kernel-rows")
    assert packed_linear.env_layouts()[torch.bfloat16] == packed_linear.GEMV_ROWS
    assert packed_linear.env_layouts()[torch.float32] == packed_linear.GEMV
    fits = packed_linear.pack_cpu_linear(torch.randn(64, 96).to(torch.bfloat16), min_bytes=0)
    misfit = packed_linear.pack_cpu_linear(torch.randn(60, 96).to(torch.bfloat16), min_bytes=0)
    assert type(fits) is Bf16RowsLinear and type(misfit) is Bf16GemvLinear
