"""xtp's GEMV kernel split across threads (``accelerators/cpu/csrc/gemv_pool.c``).

On 1-4 threads, both instruction sets this CPU has, fp32 and bf16, 1, 4 and 16 input rows and
weights whose rows leave a tail block: every result equals the one-thread result bit for bit
(each output is summed in the same order whatever the split) and each row equals that row
computed alone, within fp32 rounding of the exact product. The pool survives fork (a child
starts its own workers), serves several Python threads at once, and the GIL is released while
it computes.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading

import pytest
import torch

from xtp.accelerators.cpu import gemv as cpu_gemv
from xtp.accelerators.cpu.gemv import Bf16GemvLinear, GemvLinear, kernel_isa, unavailable_reason

pytestmark = pytest.mark.skipif(not kernel_isa(), reason=f"no GEMV kernel: {unavailable_reason()}")


def _isas() -> list[str]:
    with open("/proc/cpuinfo") as f:
        flags = set(next(x for x in f if x.startswith("flags")).split(":", 1)[1].split())
    return [isa for isa, need in (("avx512", {"avx512f"}), ("avx2", {"avx2", "fma"}))
            if need <= flags]


@pytest.fixture(params=_isas() if kernel_isa() else ["none"])
def isa(request):
    kernel, before = cpu_gemv._kernel, kernel_isa()
    assert kernel.use(request.param)
    yield request.param
    assert kernel.use(before)


@pytest.fixture(autouse=True)
def kernel_on_every_thread_count(monkeypatch):
    """These tests are about the pool: let the kernel serve ranks of any thread count (the
    default serves one-thread ranks only: gemv.MAX_KERNEL_THREADS), on its own pool unless a
    test asks for torch's OpenMP team (``mode``)."""
    monkeypatch.setenv("XTP_CPU_GEMV_THREADS", "256")
    original = cpu_gemv._team  # tests may swap the list (monkeypatch) or change its contents
    before = list(original)
    cpu_gemv.set_team_mode(False)
    yield
    cpu_gemv._team = original  # as it was, for the tests after these
    cpu_gemv.set_team_mode(bool(before and before[0]))
    original[:] = before


@pytest.fixture(params=["pool", "team"])
def mode(request):
    """The kernel's own pool, or torch's OpenMP team (team mode: ``openmp_team``)."""
    if request.param == "team" and not cpu_gemv.set_team_mode(True):
        pytest.fail("torch's OpenMP runtime was not found: team mode cannot be tested here")
    return request.param


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# (out, in): row tails (not a multiple of 8), column tails (not a multiple of 16 / 32), and big
# enough that 4 threads each get a part (the pool gives a thread no less than 64 KiB of weight)
SHAPES = [(1001, 333), (77, 4099), (520, 256)]


def _layer(dtype: torch.dtype, out_f: int, in_f: int):
    g = torch.Generator().manual_seed(out_f * 7 + in_f)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype)
    lin = (GemvLinear if dtype == torch.float32 else Bf16GemvLinear)(w)
    return lin, w, b, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_threads_split_a_product_exactly(isa, mode, threads_restored, dtype, out_f, in_f):
    lin, w, b, g = _layer(dtype, out_f, in_f)
    itemsize = w.element_size()
    for rows in (1, 4, 16):
        x = torch.randn(rows, in_f, generator=g).to(dtype)
        torch.set_num_threads(1)
        one = lin.matmul(x, b)
        for threads in (2, 3, 4):
            # the split is real: the pool gives this product the threads asked for
            assert cpu_gemv._kernel.threads_for(out_f, in_f, itemsize, threads) == threads
            torch.set_num_threads(threads)
            assert torch.equal(lin.matmul(x, b), one), (rows, threads)
        # a row in a batch is computed as it is alone
        for j in (0, rows - 1):
            assert torch.equal(lin.matmul(x[j:j + 1], b), one[j:j + 1])
        # within fp32 rounding (4 in eps per term) of the exact product, then (bf16) one
        # rounding to bf16 (half an ulp: 2**-9 relative)
        exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
        bound = 4 * in_f * torch.finfo(torch.float32).eps * (
            x.double().abs() @ w.double().abs().T + b.double().abs())
        if dtype == torch.bfloat16:
            bound = bound + exact.abs() * 2**-8
        assert ((one.double() - exact).abs() <= bound + 1e-30).all()


def test_small_products_use_fewer_threads():
    k = cpu_gemv._kernel
    assert k.threads_for(8, 16, 4, 16) == 1  # 512 bytes: not worth a second thread
    assert k.threads_for(4096, 4096, 4, 16) == 16
    assert k.threads_for(16, 4096 * 64, 4, 16) == 2  # two blocks of 8 rows: two parts at most
    with pytest.raises(ValueError, match="threads must be at least 1"):
        k.threads_for(8, 8, 4, 0)
    x = torch.zeros(1, 8)
    with pytest.raises(ValueError, match=r"^gemv\(w, x, b, y, out, in\[, m\[, threads\]\]\): "
                                         r"threads must be at least 1$"):
        k.gemv(x.data_ptr(), x.data_ptr(), None, x.data_ptr(), 1, 8, 1, 0)
    with pytest.raises(TypeError, match=r"takes 6 to 8 arguments$"):
        k.gemv(x.data_ptr(), x.data_ptr(), None, x.data_ptr(), 1)


def _bytes(t: torch.Tensor) -> bytes:
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_the_pool_works_in_a_fork_child():
    """A child forked after the parent's pool started computes with a pool of its own. The
    child touches no torch op (torch's own thread pool is not fork-safe): addresses and bytes."""
    k = cpu_gemv._kernel
    w, x = torch.randn(1001, 333), torch.randn(4, 333)
    want, got = torch.empty(4, 1001), torch.empty(4, 1001)
    k.gemv(w.data_ptr(), x.data_ptr(), None, want.data_ptr(), 1001, 333, 4, 1)
    k.gemv(w.data_ptr(), x.data_ptr(), None, got.data_ptr(), 1001, 333, 4, 4)
    assert _bytes(got) == _bytes(want) and k.pool_workers() >= 3
    got.zero_()
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 when all is well
        code = 1
        try:
            fresh = k.pool_workers() == 0
            k.gemv(w.data_ptr(), x.data_ptr(), None, got.data_ptr(), 1001, 333, 4, 4)
            code = 0 if fresh and k.pool_workers() >= 3 and _bytes(got) == _bytes(want) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_python_threads_share_the_pool():
    k = cpu_gemv._kernel
    w = torch.randn(1001, 333)
    xs = [torch.randn(4, 333) for _ in range(4)]
    want = [torch.empty(4, 1001) for _ in xs]
    for x, y in zip(xs, want):
        k.gemv(w.data_ptr(), x.data_ptr(), None, y.data_ptr(), 1001, 333, 4, 1)
    got = [torch.empty(4, 1001) for _ in xs]

    def loop(i: int) -> None:
        for _ in range(50):
            k.gemv(w.data_ptr(), xs[i].data_ptr(), None, got[i].data_ptr(), 1001, 333, 4, 3)

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(_bytes(a) == _bytes(b) for a, b in zip(got, want))


def _ran_meanwhile(body) -> bool:
    """Whether this thread got the GIL while ``body`` ran in another thread. With a switch
    interval longer than the test, the GIL changes hands only when its holder releases it:
    here, while ``body`` runs (released around each kernel call: a hundred chances for this
    thread to take it) or when the thread ends (held throughout)."""
    done = []

    def run():
        body()
        done.append(True)

    before = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        t = threading.Thread(target=run)
        t.start()  # returns once this thread has the GIL back
        meanwhile = not done
        t.join()
    finally:
        sys.setswitchinterval(before)
    return meanwhile


def test_the_gil_is_released_while_computing():
    k = cpu_gemv._kernel
    w, x, y = torch.randn(512, 1024), torch.randn(16, 1024), torch.empty(16, 512)
    p, xb = cpu_gemv.pack_bf16(w.bfloat16()), x.bfloat16()
    yb = torch.empty(16, 512, dtype=torch.bfloat16)
    assert _ran_meanwhile(lambda: [k.gemv(w.data_ptr(), x.data_ptr(), None, y.data_ptr(),
                                          512, 1024, 16, 2) for _ in range(100)])
    assert _ran_meanwhile(lambda: [k.gemv_bf16(p.data_ptr(), xb.data_ptr(), None, yb.data_ptr(),
                                               512, 1024, 16, 1) for _ in range(100)])
    # the control: a body that holds the GIL throughout is seen as such
    assert not _ran_meanwhile(lambda: sum(range(200_000)))


def test_gemv_threads_env_limits_the_threads_the_kernel_serves(monkeypatch):
    from xtp.accelerators.cpu import gemv

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.delenv("XTP_CPU_GEMV_THREADS", raising=False)
    assert gemv.kernel_threads() == 0  # the default: one-thread ranks only
    monkeypatch.setenv("XTP_CPU_GEMV_THREADS", "1")
    assert gemv.kernel_threads() == 0  # 4 threads > 1: torch's parallel path serves
    monkeypatch.setenv("XTP_CPU_GEMV_THREADS", "8")
    assert gemv.kernel_threads() == 4


def test_bf16_products_go_to_the_kernel_on_torchs_team_at_any_thread_count(monkeypatch):
    """The default (no XTP_CPU_GEMV_THREADS): fp32 on one-thread ranks only; bf16 on every
    thread count where products run on torch's own OpenMP team, else none either."""
    from xtp.accelerators.cpu import gemv

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.delenv("XTP_CPU_GEMV_THREADS", raising=False)
    assert gemv.set_team_mode(True)
    assert gemv.kernel_threads(torch.bfloat16) == 4 and gemv.unpack_threads() == 4
    assert gemv.kernel_threads(torch.float32) == 0
    gemv.set_team_mode(False)  # no team (not found, or XTP_CPU_GEMV_TEAM=0): not the pool
    assert gemv.kernel_threads(torch.bfloat16) == 0 and gemv.unpack_threads() == 1
    monkeypatch.setattr(gemv, "_team", [])
    monkeypatch.setenv("XTP_CPU_GEMV_TEAM", "0")
    assert gemv.kernel_threads(torch.bfloat16) == 0
    monkeypatch.setenv("XTP_CPU_GEMV_THREADS", "2")  # an explicit limit holds for bf16 too
    monkeypatch.setattr(gemv, "_team", [])
    monkeypatch.setenv("XTP_CPU_GEMV_TEAM", "1")
    assert gemv.kernel_threads(torch.bfloat16) == 0


@pytest.mark.parametrize("shape", [(45, 333), (512, 1000), (1027, 64)])
@pytest.mark.parametrize("threads", [1, 3])
def test_bf16_unpack_split_across_threads_is_bit_exact(mode, threads_restored, shape, threads):
    """The prefill path's unpack, split by row blocks across the pool or torch's team, gives
    the weight back bit for bit (row tails, column tails, parts of several blocks)."""
    from xtp.accelerators.cpu import gemv

    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    packed = gemv.pack_bf16(w)
    torch.set_num_threads(threads)
    out = torch.empty(shape, dtype=torch.bfloat16)
    cpu_gemv._kernel.unpack_bf16(packed.data_ptr(), out.data_ptr(), *shape, threads)
    assert torch.equal(out, w) and torch.equal(gemv.unpack_bf16(packed, shape), w)
    assert torch.equal(gemv.Bf16GemvLinear(w).unpack(), w)


def test_team_mode_finds_torchs_openmp_runtime_and_can_be_switched(monkeypatch):
    """On Linux with torch's bundled OpenMP runtime: GOMP_parallel is found in the library
    already loaded; XTP_CPU_GEMV_TEAM decides the mode the first time a product needs threads."""
    from xtp.accelerators.cpu.openmp_team import gomp_parallel_address

    assert isinstance(gomp_parallel_address(), int)
    assert cpu_gemv.set_team_mode(True) and cpu_gemv.team_mode()
    assert not cpu_gemv.set_team_mode(False) and not cpu_gemv.team_mode()
    monkeypatch.setattr(cpu_gemv, "_team", [])
    monkeypatch.setenv("XTP_CPU_GEMV_TEAM", "off")
    assert not cpu_gemv.team_mode()
    monkeypatch.setattr(cpu_gemv, "_team", [])
    monkeypatch.delenv("XTP_CPU_GEMV_TEAM")
    assert cpu_gemv.team_mode()  # the default where the runtime is found
    # torch binds GOMP_parallel in the global symbol scope: found without reading the maps
    assert gomp_parallel_address("/nonexistent/maps") == gomp_parallel_address()


TEAM_THREADS = """
import os, torch
from xtp.accelerators.cpu import gemv
torch.set_num_threads(3)
a = torch.zeros(3 << 17)
a.fill_(1.0)  # torch's parallel region: its OpenMP team of 3 exists from here on
tasks = lambda: len(os.listdir("/proc/self/task"))
before = tasks()
assert gemv.set_team_mode(True)
lin = gemv.GemvLinear(torch.randn(256, 2048))
x = torch.randn(1, 2048)
for _ in range(3):
    y = lin.matmul(x)
    a.fill_(2.0)
assert torch.equal(y, lin.matmul(x))
print(before, tasks(), gemv._kernel.pool_workers())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_team_mode_runs_products_on_torchs_threads_and_starts_none():
    """Team mode's products run on the OpenMP threads torch already started: the process has
    as many threads after products split three ways as before (a second runtime's team, or the
    kernel's own pool, would add two)."""
    proc = subprocess.run([sys.executable, "-c", TEAM_THREADS], capture_output=True, text=True,
                          env=dict(os.environ, XTP_CPU_GEMV_THREADS="8"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    before, after, workers = map(int, proc.stdout.split())
    assert after == before and workers == 0


def test_gemv_split_gives_the_kernel_its_own_thread_count(monkeypatch):
    """XTP_CPU_GEMV_SPLIT: products split across that many pool threads (or the process's
    CPUs) while torch runs on one thread; the pool serves then, never torch's team."""
    from xtp.accelerators.errors import EnvSettingError

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(cpu_gemv, "_team", [])
    monkeypatch.setenv("XTP_CPU_GEMV_SPLIT", "3")
    assert cpu_gemv.kernel_threads() == 3
    assert not cpu_gemv.team_mode()
    monkeypatch.setenv("XTP_CPU_GEMV_SPLIT", "cores")
    assert cpu_gemv.kernel_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("XTP_CPU_GEMV_SPLIT", "all")
    with pytest.raises(EnvSettingError, match=r"^XTP_CPU_GEMV_SPLIT"):
        cpu_gemv.kernel_threads()
