"""The shared-memory CPU communicator (issue 7), over real processes.

Tier: CPU, real ranks (gloo for setup and as the reference). Group sizes 2, 3 and 4 run on
one 4-rank pool (groups of 2 and 3 are sub-groups of it, so group-local ranks are exercised);
the killed-rank test spawns its own fresh ranks. Timeouts are short on purpose.
"""

from __future__ import annotations

import glob
import hashlib
import math
import multiprocessing as mp
import os
import queue
import re
import signal
import time

import pytest
import torch
import torch.distributed as dist

import ranks
from xtp.accelerators import (
    CollectiveError,
    CollectiveMismatchError,
    CollectiveTimeoutError,
    CountingCommunicator,
    ShmCommunicator,
    TorchCommunicator,
    create_cpu_communicator,
)
from xtp.accelerators.comm.host import process_gone
from xtp.accelerators.cpu.shm_segment import PREFIX, SHM_DIR
from xtp.accelerators.cpu.shm_setup import disabled_reason, resolve_chunk_bytes, resolve_timeout
from xtp.accelerators.cpu.shm_wait import memory_order_ok
from xtp.accelerators.cpu.threads import threads_per_rank
from xtp.accelerators.devices.cpu import CpuAccelerator

pytestmark = pytest.mark.skipif(
    memory_order_ok() is not None or not os.path.isdir(SHM_DIR),
    reason="shared-memory path needs x86-64 Linux with /dev/shm",
)

POOL = 4
SMALL_CHUNK = 64 << 10  # forces many chunks on multi-MB tensors
DTYPES = ("float32", "bfloat16", "float16")


# ---- helpers that run inside ranks -------------------------------------------------------
def _on_group(size: int, fn, *args):
    """Run ``fn(group, *args)`` on global ranks ``[0, size)`` (a sub-group when smaller than
    the world); other ranks return ``None``. Leaves no group behind."""
    group = dist.new_group(list(range(size))) if size < dist.get_world_size() else None
    try:
        return fn(group, *args) if dist.get_rank() < size else None
    finally:
        if group is not None and dist.get_rank() < size:
            dist.destroy_process_group(group)


def _shm(group, **kw) -> ShmCommunicator:
    comm, why = ShmCommunicator.create(group, timeout=kw.pop("timeout", 20), **kw)
    assert comm is not None, why
    assert not os.path.exists(os.path.join(SHM_DIR, comm.segment_name)), "name not unlinked"
    return comm


def _inputs(kind: str, numel: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    if kind == "int":  # integer-valued: every dtype and every summation order is exact
        return ((torch.arange(numel) * (rank + 3)) % 17 - 8).to(dtype)
    g = torch.Generator().manual_seed(1000 * rank + numel)
    return torch.randn(numel, generator=g).to(dtype)


def _expected(kind: str, numel: int, world: int, dtype: torch.dtype) -> torch.Tensor:
    """fp32 sum in rank order, rounded once: what the contract promises, bit for bit."""
    acc = _inputs(kind, numel, 0, dtype).float()
    for r in range(1, world):
        acc += _inputs(kind, numel, r, dtype).float()
    return acc.to(dtype)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _all_reduce_cases(group, numels, chunk):
    comm = _shm(group, chunk_bytes=chunk)
    world, digests = comm.world_size, []
    try:
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            tol = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}[dtype_name]
            for numel in numels:
                for kind in ("int", "rand"):
                    case = f"{dtype_name} n={numel} {kind} world={world}"
                    x = _inputs(kind, numel, comm.rank, dtype)
                    ref = x.clone()
                    dist.all_reduce(ref, group=group)
                    # non-contiguous: every other column of a wider buffer, sentinels between
                    base = torch.full((numel, 2), -7.0, dtype=dtype)
                    view = base[:, 0]
                    view.copy_(x)
                    assert comm.all_reduce(x) is x
                    comm.all_reduce(view)
                    want = _expected(kind, numel, world, dtype)
                    assert torch.equal(x, want), case
                    assert torch.equal(view, want), case + " (non-contiguous)"
                    assert (base[:, 1] == -7).all(), case + ": wrote outside the view"
                    if kind == "int":
                        assert torch.equal(x, ref), case + ": differs from gloo"
                    else:
                        torch.testing.assert_close(x.float(), ref.float(), rtol=tol, atol=tol)
                    digests.append(_digest(x))
        empty = torch.empty(0)
        assert comm.all_reduce(empty) is empty
    finally:
        comm.close()
    return digests


def _all_gather_cases(group, chunk):
    comm = _shm(group, chunk_bytes=chunk)
    gloo = TorchCommunicator(group)
    r, w = comm.rank, comm.world_size
    out = []
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool):
            for rows, dim, uneven in ((3, 0, False), (5, -1, True), (70_000, 0, True)):
                n = rows + (r if uneven else 0)
                sizes = [rows + (i if uneven else 0) for i in range(w)] if uneven else None
                shape = (n, 6) if dim == 0 else (4, n)
                piece = (torch.arange(n * 6 if dim == 0 else 4 * n) % 97 + 10 * r)
                piece = piece.reshape(shape).to(dtype)
                if dim == -1:
                    piece = piece.t().contiguous().t()  # non-contiguous input
                got = comm.all_gather(piece, dim, sizes)
                want = gloo.all_gather(piece, dim, sizes)
                assert got.dtype == dtype and torch.equal(got, want), (dtype, rows, dim)
                out.append(_digest(got))
            # along a later dimension, whole rows of every rank per chunk (vocab-parallel
            # logits: (batch, tokens, vocab / tp)), over several chunks; along a middle one;
            # and rows wider than a chunk (the transposing path)
            for shape, dim in (((2, 3000, 5), -1), ((3, 4, 6), 1), ((2, 20_000), -1)):
                shape = list(shape)
                shape[dim] += r  # uneven extents
                sizes = [shape[dim] - r + i for i in range(w)]
                piece = (torch.arange(math.prod(shape)) % 89 + 7 * r).reshape(shape).to(dtype)
                got = comm.all_gather(piece, dim, sizes)
                want = gloo.all_gather(piece, dim, sizes)
                assert got.dtype == dtype and torch.equal(got, want), (dtype, shape, dim)
                out.append(_digest(got))
    finally:
        comm.close()
    return out


def _two_groups():
    """World 4 split into TP groups [0,1] and [2,3], both all-reducing at the same time."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    rank = dist.get_rank()
    mine = groups[rank // 2]
    comm = _shm(mine, chunk_bytes=SMALL_CHUNK)
    try:
        for step in range(50):
            numel = 1000 + 37 * step if step % 10 else 100_000
            x = torch.full((numel,), float(rank * 10 + step))
            comm.all_reduce(x)
            lo = (rank // 2) * 2
            assert torch.equal(x, torch.full_like(x, float(lo * 10 + (lo + 1) * 10 + 2 * step)))
        return comm.segment_name
    finally:
        comm.close()
        dist.destroy_process_group(mine)


def _timeout_task(group):
    comm = _shm(group, timeout=1.0)
    try:
        if comm.rank == 1:
            return None  # never arrives
        t0 = time.monotonic()
        with pytest.raises(CollectiveTimeoutError) as info:
            comm.all_reduce(torch.ones(10))
        elapsed = time.monotonic() - t0
        with pytest.raises(CollectiveTimeoutError, match="failed earlier"):
            comm.all_reduce(torch.ones(10))
        return str(info.value), elapsed
    finally:
        comm.close()


def _announced_failure_task(group):
    from xtp.accelerators.comm.abort import announce

    comm = _shm(group, timeout=30.0)
    try:
        comm.all_reduce(torch.ones(10))  # one good step: the failure comes mid-run
        if comm.rank == 1:
            # what collective_failure does when another group's collective fails on this rank
            announce("the data-parallel gradient all-reduce failed on rank 1: node gone")
            with pytest.raises(CollectiveTimeoutError, match="failed in another collective"):
                comm.all_reduce(torch.ones(10))
            return None
        t0 = time.monotonic()
        with pytest.raises(CollectiveError) as info:
            comm.all_reduce(torch.ones(10))
        assert not isinstance(info.value, CollectiveTimeoutError)
        return str(info.value), time.monotonic() - t0
    finally:
        comm.close()


def _mismatch_task(group):
    comm = _shm(group)
    try:
        with pytest.raises(CollectiveMismatchError) as info:
            comm.all_reduce(torch.ones(10 + 10 * comm.rank))
        return str(info.value)
    finally:
        comm.close()


def _fallback_task(group):
    comm = _shm(group)
    spy = comm.fallback = CountingCommunicator(comm.fallback)
    try:
        for dtype in (torch.int64, torch.float64, torch.float32):
            x = torch.arange(8, dtype=dtype) + comm.rank
            comm.all_reduce(x)
            assert torch.equal(x, (torch.arange(8, dtype=dtype) * 2 + 1)), dtype
        t = torch.arange(4.0) if comm.rank == 0 else torch.zeros(4)
        comm.broadcast(t, 0)
        assert torch.equal(t, torch.arange(4.0))
        comm.barrier()
        return [(r.op, str(r.dtype)) for r in spy.records]
    finally:
        comm.close()


def _switch_task(group):
    def kind(**kw):
        comm = create_cpu_communicator(group, timeout=5, **kw)
        name = type(comm).__name__
        if isinstance(comm, ShmCommunicator):
            comm.close()
        return name

    saved = {k: os.environ.pop(k, None) for k in ("XTP_CPU_SHM", "XTP_DIST_BACKEND")}
    try:
        got = {"default": kind(), "option": kind(enabled=False)}
        os.environ["XTP_CPU_SHM"] = "0"
        got["XTP_CPU_SHM=0"] = kind()
        got["forced"] = kind(enabled=True)
        del os.environ["XTP_CPU_SHM"]
        os.environ["XTP_DIST_BACKEND"] = "gloo"
        got["XTP_DIST_BACKEND"] = kind()
        del os.environ["XTP_DIST_BACKEND"]
        acc = CpuAccelerator().communicator(group)
        got["accelerator"] = type(acc).__name__
        acc.close()
        got["accelerator(shm=False)"] = type(CpuAccelerator(shm=False).communicator(group)).__name__
        return got
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _setup_failure_task(group, what):
    """Make setup fail on group rank 1; every rank must fall back, leaving nothing behind."""
    from xtp.accelerators.cpu import shm_setup as setup

    saved_here, saved_attach = setup.HostIdentity.here, setup.ShmSegment.attach
    if dist.get_rank(group) == 1:
        if what == "other host":
            def here():
                me = saved_here()
                return setup.HostIdentity("elsewhere", me.boot_id, me.pid_ns, me.pid,
                                          me.global_rank, None)
            setup.HostIdentity.here = staticmethod(here)
        else:
            def attach(*a, **k):
                raise OSError("simulated: no such file")
            setup.ShmSegment.attach = staticmethod(attach)
    try:
        comm, why = ShmCommunicator.create(group, timeout=5)
        return comm is None, why, os.getpid()
    finally:
        setup.HostIdentity.here, setup.ShmSegment.attach = saved_here, saved_attach


def _leftovers(pids) -> list[str]:
    return [p for pid in pids for p in glob.glob(os.path.join(SHM_DIR, f"{PREFIX}{pid}_*"))]


# ---- tests ------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3, 4])
def test_all_reduce_equals_gloo_every_dtype(rank_pool, world):
    digests = rank_pool(POOL).run(_on_group, world, _all_reduce_cases, (1, 5, 4099), None)
    assert all(d == digests[0] for d in digests[:world]), "ranks disagree bitwise"


@pytest.mark.distributed
@pytest.mark.parametrize("world,chunk", [(2, SMALL_CHUNK), (3, None)])
def test_all_reduce_multi_megabyte_chunked(rank_pool, world, chunk):
    # 786_433 fp32 elements = 3 MB: 48 chunks of 64 KB, or 3 of the default 1 MB
    digests = rank_pool(POOL).run(_on_group, world, _all_reduce_cases, (786_433,), chunk)
    assert all(d == digests[0] for d in digests[:world])


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3, 4])
def test_all_gather_equals_gloo(rank_pool, world):
    digests = rank_pool(POOL).run(_on_group, world, _all_gather_cases, SMALL_CHUNK)
    assert all(d == digests[0] for d in digests[:world])


@pytest.mark.distributed
def test_two_tp_groups_on_one_host_do_not_interfere(rank_pool):
    names = rank_pool(POOL).run(_two_groups)
    assert names[0] == names[1] and names[2] == names[3] and names[0] != names[2]


@pytest.mark.distributed
def test_missing_rank_times_out_naming_it(rank_pool):
    results = rank_pool(POOL).run(_on_group, 2, _timeout_task)
    message, elapsed = results[0]
    assert "group rank 1 (global rank 1" in message and "timed out after 1 s" in message
    assert elapsed < 10


@pytest.mark.distributed
def test_peer_failed_in_another_collective_is_quoted_at_once(rank_pool):
    message, elapsed = rank_pool(POOL).run(_on_group, 2, _announced_failure_task)[0]
    assert re.fullmatch(
        r"xtp shared-memory all_reduce \(step #2\) on a group of 2 ranks \(this is group rank "
        r"0\): group rank 1 \(global rank 1, pid \d+\) did not arrive: it failed in another "
        r"collective and will never arrive; its error: the data-parallel gradient all-reduce "
        r"failed on rank 1: node gone", message), message
    assert elapsed < 10  # not the 30 s timeout


def test_collective_failure_is_announced_to_listeners():
    from xtp.accelerators.comm import abort
    from xtp.accelerators.comm.failures import collective_failure

    class Listener:
        heard: list[str] = []

        def peer_failed_elsewhere(self, message: str) -> None:
            self.heard.append(message)

    listener = Listener()
    abort.register(listener)
    err = collective_failure("the test all-reduce", None, RuntimeError("Connection reset"))
    assert isinstance(err, CollectiveError)
    assert listener.heard == [str(err)] and "Connection reset" in str(err)


@pytest.mark.distributed
def test_mismatched_collectives_raise_on_every_rank(rank_pool):
    messages = rank_pool(POOL).run(_on_group, 2, _mismatch_task)
    assert all("every rank must call the same collectives" in m for m in messages[:2])


@pytest.mark.distributed
def test_unsupported_dtypes_and_ops_go_to_gloo(rank_pool):
    records = rank_pool(POOL).run(_on_group, 2, _fallback_task)[0]
    assert records == [
        ("all_reduce", "torch.int64"), ("all_reduce", "torch.float64"),
        ("broadcast", "torch.float32"),
    ]  # float32 all_reduce went through shared memory; barrier is not recorded


@pytest.mark.distributed
def test_switches_and_accelerator_wiring(rank_pool):
    got = rank_pool(POOL).run(_on_group, 2, _switch_task)[0]
    assert got == {
        "default": "ShmCommunicator", "option": "TorchCommunicator",
        "XTP_CPU_SHM=0": "TorchCommunicator", "forced": "ShmCommunicator",
        "XTP_DIST_BACKEND": "TorchCommunicator", "accelerator": "ShmCommunicator",
        "accelerator(shm=False)": "TorchCommunicator",
    }


@pytest.mark.distributed
@pytest.mark.parametrize("what", ["other host", "attach fails"])
def test_setup_failure_falls_back_everywhere_and_cleans_up(rank_pool, what):
    results = rank_pool(POOL).run(_on_group, 3, _setup_failure_task, what)[:3]
    assert all(fell_back for fell_back, _, _ in results)
    reason = results[0][1]
    assert ("not one host" in reason) if what == "other host" else ("simulated" in reason)
    assert _leftovers(pid for _, _, pid in results) == []


def _victim_task(victim: int, timeout: float):
    dist.init_process_group("gloo")
    comm = _shm(None, timeout=timeout)
    x = torch.ones(1000)
    for _ in range(20):
        comm.all_reduce(x)
    if comm.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)  # let the victim die first: the survivors are then mid-wait
    t0 = time.monotonic()
    try:
        comm.all_reduce(x)
    except CollectiveTimeoutError as exc:
        return "raised", str(exc), time.monotonic() - t0, comm.segment_name, os.getpid()
    return "completed", "", time.monotonic() - t0, comm.segment_name, os.getpid()


@pytest.mark.distributed
def test_killed_rank_is_named_and_nothing_leaks():
    world, victim, timeout = 3, 1, 30.0
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = ranks.free_port()
    procs = [
        ctx.Process(target=ranks._one_shot,
                    args=(r, world, port, None, _victim_task, (victim, timeout), out))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + 120
    try:
        while len(results) < world - 1 and time.monotonic() < deadline:
            try:
                rank, ok, value = out.get(timeout=1)
            except queue.Empty:
                continue
            assert ok, value
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert procs[victim].exitcode == -signal.SIGKILL
    assert sorted(results) == [r for r in range(world) if r != victim]
    for status, message, elapsed, name, _pid in results.values():
        assert status == "raised"
        assert f"group rank {victim} (global rank {victim}" in message and "exited" in message
        assert elapsed < 5, f"took {elapsed:.1f} s to notice the dead rank (timeout {timeout})"
        assert not os.path.exists(os.path.join(SHM_DIR, name))
    creator = results[0][4]
    assert _leftovers([creator]) == []


# ---- in-process units -------------------------------------------------------------------
def test_without_process_group_is_single_rank():
    comm = create_cpu_communicator(None)
    assert isinstance(comm, TorchCommunicator) and comm.world_size == 1


def test_switch_and_option_parsing(monkeypatch):
    assert disabled_reason() is None
    monkeypatch.setenv("XTP_CPU_SHM", "off")
    assert "XTP_CPU_SHM" in disabled_reason()
    assert disabled_reason(enabled=True) is None
    monkeypatch.delenv("XTP_CPU_SHM")
    monkeypatch.setenv("XTP_DIST_BACKEND", "ccl")
    assert "XTP_DIST_BACKEND=ccl" in disabled_reason()
    assert "option" in disabled_reason(enabled=False)

    monkeypatch.delenv("XTP_TIMEOUT", raising=False)
    assert resolve_timeout() == 300.0 and resolve_timeout(2) == 2.0
    monkeypatch.setenv("XTP_TIMEOUT", "7.5")
    assert resolve_timeout() == 7.5
    monkeypatch.setenv("XTP_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="XTP_TIMEOUT"):
        resolve_timeout()
    with pytest.raises(ValueError):
        resolve_timeout(0)
    assert resolve_chunk_bytes(100) == 128 and resolve_chunk_bytes() == 1 << 20


def test_threads_per_rank(monkeypatch):
    monkeypatch.delenv("XTP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads_per_rank(2, cores=16) == 8
    assert threads_per_rank(1, cores=16) == 16
    assert threads_per_rank(4, cores=2) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # two TP groups of 4 on this host
    assert threads_per_rank(4, cores=16) == 2
    assert threads_per_rank(4, cores=16, local_ranks=1) == 16
    assert threads_per_rank(1) >= 1
    monkeypatch.setenv("XTP_NUM_THREADS", "3")
    assert threads_per_rank(2, cores=16) == 3
    monkeypatch.setenv("XTP_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="XTP_NUM_THREADS"):
        threads_per_rank(2)
    with pytest.raises(ValueError):
        threads_per_rank(0)


def test_process_gone_sees_exited_and_zombie_processes():
    assert not process_gone(os.getpid())
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    deadline = time.monotonic() + 5
    while not process_gone(pid) and time.monotonic() < deadline:  # zombie until reaped
        time.sleep(0.01)
    assert process_gone(pid)
    os.waitpid(pid, 0)
    assert process_gone(pid)
