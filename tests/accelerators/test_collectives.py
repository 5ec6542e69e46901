"""Distributed tier: real multi-process collectives over gloo, at 2 and 4 ranks.

* Every :class:`TorchCommunicator` operation, the counting wrapper, and the autograd-aware
  functions (gradients compared with their analytic values) run on long-lived gloo ranks
  (the ``rank_pool`` fixture).
* ``xtp.init_distributed`` runs in fresh processes started like ``torchrun`` does (``spawn``):
  TP/DP groups, errors, and the vendor backend names ``hccl``, ``xccl`` and ``ccl`` registered
  over gloo so that xtp's real init path runs real collectives under those names
  (``..._aliased_over_gloo``: this proves xtp's wiring, not the vendor libraries).
"""

from __future__ import annotations

import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import fakes
import xtp
from ranks import spawn
from xtp.accelerators import (
    CollectiveRecord,
    CountingCommunicator,
    TorchCommunicator,
    copy_to_group,
    gather_from_group,
    reduce_from_group,
    scatter_to_group,
)
from xtp.distributed.setup import default_timeout
from xtp.errors import DistributedSetupError, TPSizeError

pytestmark = pytest.mark.distributed

WORLDS = [2, 4]
#: uneven split of an extent over 2 and 4 ranks (the 4-rank one has an empty piece)
UNEVEN = {2: [3, 1], 4: [3, 0, 2, 1]}
EVEN = {2: [2, 2], 4: [2, 2, 2, 2]}
#: the init-path tests are the CPU + gloo tier, also on a GPU host (where auto-detect is cuda)
CPU = {"XTP_ACCELERATOR": "cpu"}


# ---- helpers run inside the ranks ------------------------------------------------------------


def _full(sizes: list[int], dim: int) -> torch.Tensor:
    """The whole tensor every rank can compute: extent ``sum(sizes)`` along ``dim``."""
    total = sum(sizes)
    shape = (total, 3) if dim == 0 else (2, 3, total)
    return torch.arange(float(torch.Size(shape).numel())).reshape(shape)


def _piece(full: torch.Tensor, sizes: list[int], dim: int, rank: int) -> torch.Tensor:
    return full.narrow(dim, sum(sizes[:rank]), sizes[rank])


def _sizes(kind: str, world: int) -> list[int]:
    return (UNEVEN if kind == "uneven" else EVEN)[world]


def _rank_weight(rank: int, like: torch.Tensor) -> torch.Tensor:
    """A per-rank upstream gradient, different on every rank."""
    return (rank + 1) * 10.0 + torch.arange(float(like.numel())).reshape(like.shape)


# ---- TorchCommunicator operations (pool tasks) --------------------------------------------


def _all_reduce():
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = TorchCommunicator()
    total = world * (world + 1) / 2
    t = torch.full((3, 4), rank + 1.0)
    assert comm.all_reduce(t) is t
    assert torch.equal(t, torch.full((3, 4), total))
    base = torch.arange(12.0).reshape(3, 4) * (rank + 1)
    view = base.t()  # non-contiguous: the result must land in the caller's storage
    assert not view.is_contiguous()
    assert comm.all_reduce(view) is view
    assert torch.equal(base, torch.arange(12.0).reshape(3, 4) * total)
    return comm.world_size, comm.rank


@pytest.mark.parametrize("world", WORLDS)
def test_all_reduce_sums_in_place_including_non_contiguous(rank_pool, world):
    assert rank_pool(world).run(_all_reduce) == [(world, r) for r in range(world)]


def _all_reduce_max():
    """Element-wise maximum, in place, through TorchCommunicator's own op and through the
    interface's default (every rank's tensor gathered), which other communicators inherit."""
    from xtp.accelerators import Communicator

    rank, world = dist.get_rank(), dist.get_world_size()
    comm = TorchCommunicator()
    want = torch.tensor([[float(world), -1.0], [0.5, 3.0 * world]])
    results = []
    for reduce in (comm.all_reduce_max, lambda t: Communicator.all_reduce_max(comm, t)):
        t = torch.tensor([[rank + 1.0, -1.0 - rank], [0.5, 3.0 * (world - rank)]])
        assert reduce(t) is t
        results.append(torch.equal(t, want))
    return results


@pytest.mark.parametrize("world", WORLDS)
def test_all_reduce_max_in_place(rank_pool, world):
    assert rank_pool(world).run(_all_reduce_max) == [[True, True]] * world


def _all_gather(dim: int, kind: str):
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = _sizes(kind, world)
    full = _full(sizes, dim)
    piece = _piece(full, sizes, dim, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated torch call per gather
        out = TorchCommunicator().all_gather(piece, dim, None if kind == "even" else sizes)
    assert out.is_contiguous() and torch.equal(out, full), (out, full)
    return tuple(out.shape)


@pytest.mark.parametrize("kind", ["even", "uneven"])
@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("world", WORLDS)
def test_all_gather_along_dim(rank_pool, world, dim, kind):
    shapes = rank_pool(world).run(_all_gather, dim, kind)
    assert len(set(shapes)) == 1


def _all_gather_bad_sizes():
    world = dist.get_world_size()
    comm = TorchCommunicator()
    for sizes in ([2] * (world + 1), [5] * world):
        with pytest.raises(ValueError, match="do not match local extent"):
            comm.all_gather(torch.zeros(2, 3), 0, sizes)
    comm.barrier()  # every rank raised before any collective: nobody is left waiting
    return True


def test_all_gather_rejects_sizes_that_do_not_match_on_every_rank(rank_pool):
    assert rank_pool(2).run(_all_gather_bad_sizes) == [True, True]


def _broadcast():
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = TorchCommunicator()
    src = world - 1
    t = torch.full((2, 3), float(rank))
    comm.broadcast(t, src=src)
    assert torch.equal(t, torch.full((2, 3), float(src)))
    # a sub-group, with a group-local source: group rank 1 is global rank `members[1]`
    members = [1, 3] if world == 4 else [0, 1]
    group = _subgroup(members)
    if rank in members:
        sub = TorchCommunicator(group)
        assert sub.world_size == 2 and sub.rank == members.index(rank)
        base = torch.arange(6.0).reshape(2, 3) * (rank + 1)
        view = base.t()  # non-contiguous receive buffer
        assert sub.broadcast(view, src=1) is view
        assert torch.equal(base, torch.arange(6.0).reshape(2, 3) * (members[1] + 1))
    return True


_SUBGROUPS: dict[tuple[int, ...], object] = {}


def _subgroup(members: list[int]):
    """One sub-group per pool rank and member list, created once and kept: destroying a gloo
    group on one member while the other may still read from it can abort that rank."""
    key = tuple(members)
    if key not in _SUBGROUPS:
        _SUBGROUPS[key] = dist.new_group(members)
    return _SUBGROUPS[key]


@pytest.mark.parametrize("world", WORLDS)
def test_broadcast_from_a_non_zero_group_rank(rank_pool, world):
    assert all(rank_pool(world).run(_broadcast))


def _reduce_scatter(dim: int, kind: str):
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = _sizes(kind, world)
    full = _full(sizes, dim)
    mine = full * (rank + 1)
    out = TorchCommunicator().reduce_scatter(mine, dim, None if kind == "even" else sizes)
    total = world * (world + 1) / 2
    assert torch.equal(out, _piece(full, sizes, dim, rank) * total)
    assert torch.equal(mine, full * (rank + 1)), "the input must not be modified"
    return True


@pytest.mark.parametrize("kind", ["even", "uneven"])
@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("world", WORLDS)
def test_reduce_scatter_along_dim(rank_pool, world, dim, kind):
    assert all(rank_pool(world).run(_reduce_scatter, dim, kind))


def _barrier():
    rank = dist.get_rank()
    comm = TorchCommunicator()
    comm.barrier()
    if rank == 0:
        time.sleep(0.5)
    start = time.monotonic()
    comm.barrier()
    return time.monotonic() - start


def test_barrier_waits_for_the_slowest_rank(rank_pool):
    waited = rank_pool(4).run(_barrier)
    assert all(w >= 0.35 for w in waited[1:]), waited


# ---- CountingCommunicator ----------------------------------------------------------------


def _counting():
    comm = CountingCommunicator(TorchCommunicator())
    world = comm.world_size
    x = torch.ones(2, 3)
    comm.all_reduce(x)
    comm.all_gather(torch.ones(2, 4, dtype=torch.bfloat16), dim=0)
    comm.broadcast(torch.ones(5, dtype=torch.int64), src=0)
    comm.reduce_scatter(torch.ones(4 * world, 2), dim=0)
    comm.barrier()
    records = list(comm.records)
    counts = dict(comm.counts())
    comm.clear()
    assert comm.records == []
    return records, counts, comm.rank


def test_counting_communicator_records_op_shape_and_bytes(rank_pool):
    results = rank_pool(2).run(_counting)
    for rank, (records, counts, comm_rank) in enumerate(results):
        assert comm_rank == rank
        assert records == [
            CollectiveRecord("all_reduce", (2, 3), torch.float32, 24),
            CollectiveRecord("all_gather", (2, 4), torch.bfloat16, 16),
            CollectiveRecord("broadcast", (5,), torch.int64, 40),
            CollectiveRecord("reduce_scatter", (8, 2), torch.float32, 64),
        ]
        assert counts == {"all_reduce": 1, "all_gather": 1, "broadcast": 1, "reduce_scatter": 1}


def test_single_process_communicator_issues_no_collective():
    assert not dist.is_initialized()
    comm = CountingCommunicator(TorchCommunicator())
    assert comm.world_size == 1 and comm.rank == 0 and comm.group is None
    x = torch.arange(6.0).reshape(2, 3)
    assert comm.all_reduce(x) is x and comm.broadcast(x, src=0) is x
    gathered = comm.all_gather(x, dim=0)
    assert gathered is not x and torch.equal(gathered, x)
    assert torch.equal(comm.reduce_scatter(x, dim=-1), x)
    comm.barrier()
    assert comm.records == [] and not comm.counts()


def test_group_without_process_group_is_an_error():
    with pytest.raises(ValueError, match="not initialised"):
        TorchCommunicator(object())


def test_reduce_scatter_sizes_are_checked():
    comm = TorchCommunicator()
    with pytest.raises(ValueError, match="do not split"):
        comm.reduce_scatter(torch.ones(4), 0, [1, 2])


# ---- autograd-aware functions: gradients against their analytic values --------------------


def _copy_to_group_grad():
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = TorchCommunicator()
    x = torch.arange(6.0).reshape(2, 3).requires_grad_()
    y = copy_to_group(x, comm)
    assert torch.equal(y, x)
    (y * _rank_weight(rank, y)).sum().backward()
    expected = sum(_rank_weight(r, x) for r in range(world))  # backward all-reduces
    assert torch.equal(x.grad, expected)
    return True


def _reduce_from_group_grad():
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = TorchCommunicator()
    base = torch.arange(6.0).reshape(2, 3)
    x = (base * (rank + 1)).requires_grad_()
    y = reduce_from_group(x, comm)
    assert torch.equal(y, base * (world * (world + 1) / 2))
    assert torch.equal(x.detach(), base * (rank + 1)), "with a graph the input is not overwritten"
    (y * _rank_weight(rank, y)).sum().backward()
    assert torch.equal(x.grad, _rank_weight(rank, x))  # identity backward
    return True


def _gather_from_group_grad(dim: int, kind: str):
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = _sizes(kind, world)
    full = _full(sizes, dim)
    x = _piece(full, sizes, dim, rank).clone().requires_grad_()
    y = gather_from_group(x, TorchCommunicator(), dim, None if kind == "even" else sizes)
    assert torch.equal(y, full)
    w = _rank_weight(rank, y)
    (y * w).sum().backward()
    assert torch.equal(x.grad, _piece(w, sizes, dim, rank))  # this rank's slice of the grad
    return True


def _scatter_to_group_grad(dim: int, kind: str):
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = _sizes(kind, world)
    full = _full(sizes, dim)
    x = full.clone().requires_grad_()
    y = scatter_to_group(x, TorchCommunicator(), dim, None if kind == "even" else sizes)
    assert torch.equal(y, _piece(full, sizes, dim, rank))
    (y * _rank_weight(rank, y)).sum().backward()
    pieces = [_rank_weight(r, _piece(full, sizes, dim, r)) for r in range(world)]
    assert torch.equal(x.grad, torch.cat(pieces, dim))  # backward all-gathers
    return True


@pytest.mark.parametrize("world", WORLDS)
def test_copy_to_group_gradient_is_all_reduced(rank_pool, world):
    assert all(rank_pool(world).run(_copy_to_group_grad))


@pytest.mark.parametrize("world", WORLDS)
def test_reduce_from_group_gradient_is_identity(rank_pool, world):
    assert all(rank_pool(world).run(_reduce_from_group_grad))


@pytest.mark.parametrize("kind", ["even", "uneven"])
@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("world", WORLDS)
def test_gather_from_group_gradient_is_own_slice(rank_pool, world, dim, kind):
    assert all(rank_pool(world).run(_gather_from_group_grad, dim, kind))


@pytest.mark.parametrize("kind", ["even", "uneven"])
@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("world", WORLDS)
def test_scatter_to_group_gradient_is_all_gathered(rank_pool, world, dim, kind):
    assert all(rank_pool(world).run(_scatter_to_group_grad, dim, kind))


def _no_graph():
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = TorchCommunicator()
    sizes = EVEN[world]
    full = _full(sizes, -1)
    with torch.no_grad():
        x = torch.ones(3, requires_grad=True)
        assert copy_to_group(x, comm) is x
        y = torch.full((3,), rank + 1.0)
        assert reduce_from_group(y, comm) is y  # in place when no graph is recorded
        assert torch.equal(y, torch.full((3,), world * (world + 1) / 2))
        assert torch.equal(gather_from_group(_piece(full, sizes, -1, rank), comm), full)
        piece = scatter_to_group(full, comm)
        assert piece.is_contiguous() and torch.equal(piece, _piece(full, sizes, -1, rank))
    return True


def test_autograd_functions_without_a_graph_are_plain_collectives(rank_pool):
    assert all(rank_pool(2).run(_no_graph))


def test_autograd_functions_are_identity_at_world_one():
    comm = TorchCommunicator()
    x = torch.arange(4.0, requires_grad=True)
    for fn in (copy_to_group, reduce_from_group, gather_from_group, scatter_to_group):
        assert fn(x, comm) is x


# ---- init path: xtp.init_distributed in fresh torchrun-like processes ---------------------


def _ranks_of(group) -> list[int] | None:
    return None if group is None else dist.get_process_group_ranks(group)


def _describe(ctx) -> dict:
    comm = ctx.communicator()
    t = torch.tensor([float(ctx.rank + 1)])
    comm.all_reduce(t)
    return {
        "rank": ctx.rank, "world": ctx.world_size, "tp": (ctx.tp_rank, ctx.tp_size),
        "dp": (ctx.dp_rank, ctx.dp_size), "tp_ranks": _ranks_of(ctx.tp_group),
        "dp_ranks": _ranks_of(ctx.dp_group), "comm_world": comm.world_size,
        "tp_sum": t.item(), "backend": ctx.backend, "device": str(ctx.device),
        "accelerator": ctx.accelerator.name,
    }


def _init_world4_tp2():
    from torch.distributed.device_mesh import init_device_mesh

    ctx = xtp.init_distributed(tp_size=2)  # the fresh, torchrun-variables path
    out = {"fresh": _describe(ctx), "timeout": ctx.timeout.total_seconds()}
    if ctx.dp_group is not None:
        t = torch.tensor([float(ctx.rank + 1)])
        TorchCommunicator(ctx.dp_group).all_reduce(t)
        out["dp_sum"] = t.item()
    # the world exists now: later calls adopt it
    with pytest.raises(TPSizeError) as excinfo:
        xtp.init_distributed(tp_size=3)
    out["tp3_error"] = str(excinfo.value)
    out["tp4"] = _describe(xtp.init_distributed(tp_size=4))
    out["tp1"] = _describe(xtp.init_distributed(tp_size=1))
    out["default"] = _describe(xtp.init_distributed())
    out["group"] = _describe(xtp.init_distributed(group=ctx.tp_group))
    with pytest.raises(TPSizeError, match="the given group has 2 ranks"):
        xtp.init_distributed(tp_size=4, group=ctx.tp_group)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    out["mesh"] = _describe(xtp.init_distributed(mesh=mesh))
    bad = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    with pytest.raises(DistributedSetupError, match="'tp' dimension"):
        xtp.init_distributed(mesh=bad)
    return out


def test_init_distributed_world4_tp2_builds_tp_and_dp_groups():
    results = spawn(_init_world4_tp2, 4, env={**CPU, "XTP_TIMEOUT": "45"})
    for rank, out in enumerate(results):
        fresh = out["fresh"]
        lo = rank - rank % 2
        assert fresh["tp"] == (rank % 2, 2) and fresh["dp"] == (rank // 2, 2)
        assert fresh["tp_ranks"] == [lo, lo + 1]
        assert fresh["dp_ranks"] == [rank % 2, rank % 2 + 2]
        assert fresh["tp_sum"] == (lo + 1) + (lo + 2)  # only the TP group is summed
        assert out["dp_sum"] == (rank % 2 + 1) + (rank % 2 + 3)
        assert fresh["comm_world"] == 2
        assert fresh["backend"] == "gloo" and fresh["device"] == "cpu"
        assert fresh["accelerator"] == "cpu" and out["timeout"] == 45.0
        assert "does not divide the world size 4; choose one of [1, 2, 4]" in out["tp3_error"]
        assert out["tp4"]["tp"] == (rank, 4) and out["tp4"]["dp_ranks"] is None
        assert out["tp4"]["tp_sum"] == 10 and out["default"]["tp"] == (rank, 4)
        assert out["tp1"]["tp"] == (0, 1) and out["tp1"]["tp_ranks"] is None
        assert out["tp1"]["comm_world"] == 1 and out["tp1"]["tp_sum"] == rank + 1
        assert out["tp1"]["dp"] == (rank, 4) and out["tp1"]["dp_ranks"] == [0, 1, 2, 3]
        assert out["group"]["tp"] == (rank % 2, 2) and out["group"]["tp_sum"] == fresh["tp_sum"]
        assert out["mesh"]["tp"] == (rank % 2, 2) and out["mesh"]["dp"] == (rank // 2, 2)
        assert out["mesh"]["tp_ranks"] == [lo, lo + 1]
        assert out["mesh"]["dp_ranks"] == [rank % 2, rank % 2 + 2]


def _init_bad_tp():
    errors = []
    for tp in (3, 0, -1, 1.5):
        try:
            xtp.init_distributed(tp_size=tp)
        except TPSizeError as exc:
            errors.append(str(exc))
    return errors


def test_init_distributed_with_tp_not_dividing_world_raises():
    for errors in spawn(_init_bad_tp, 2, env=CPU):
        assert len(errors) == 4
        assert "tp_size=3 does not divide the world size 2; choose one of [1, 2]" in errors[0]
        assert all("positive integer" in e for e in errors[1:])


@pytest.fixture
def single_process(monkeypatch):
    """A plain ``python script.py``: no torchrun variables, no process group."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "XTP_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XTP_ACCELERATOR", "cpu")  # this tier is CPU + gloo, also on a GPU host
    assert not dist.is_initialized()


def test_single_process_without_torchrun_gets_tp_one(single_process):
    ctx = xtp.init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.tp_rank, ctx.tp_size, ctx.dp_size) == (0, 1, 0, 1, 1)
    assert ctx.tp_group is None and ctx.dp_group is None and ctx.backend is None
    assert ctx.accelerator.name == "cpu" and ctx.device == torch.device("cpu")
    comm = ctx.communicator()
    t = torch.ones(2)
    assert comm.world_size == 1 and comm.all_reduce(t) is t
    assert not dist.is_initialized(), "tp=1 without torchrun creates no process group"
    assert xtp.init_distributed(tp_size=1, accelerator="cpu").tp_size == 1


def test_single_process_with_tp_above_one_says_how_to_launch(single_process):
    with pytest.raises(DistributedSetupError, match="torchrun --nproc-per-node 2"):
        xtp.init_distributed(tp_size=2)


def test_group_without_initialised_world_is_an_error(single_process):
    with pytest.raises(DistributedSetupError, match="not initialised"):
        xtp.init_distributed(group=object())


# ---- XTP_TIMEOUT ---------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "seconds"), [(None, 300.0), ("120", 120.0), (" 1.5 ", 1.5),
                                              ("", 300.0), ("1e3", 1000.0)])
def test_timeout_from_env(monkeypatch, raw, seconds):
    if raw is None:
        monkeypatch.delenv("XTP_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("XTP_TIMEOUT", raw)
    assert default_timeout() == timedelta(seconds=seconds)


@pytest.mark.parametrize("raw", ["abc", "5s", "0", "-3"])
def test_timeout_from_env_rejects_bad_values(monkeypatch, raw):
    monkeypatch.setenv("XTP_TIMEOUT", raw)
    with pytest.raises(DistributedSetupError, match="XTP_TIMEOUT"):
        default_timeout()


def test_timeout_argument_and_env_reach_the_context(single_process, monkeypatch):
    assert xtp.init_distributed(timeout=7).timeout == timedelta(seconds=7)
    assert xtp.init_distributed(timeout=timedelta(minutes=2)).timeout == timedelta(minutes=2)
    monkeypatch.setenv("XTP_TIMEOUT", "33")
    assert xtp.init_distributed().timeout == timedelta(seconds=33)


# ---- vendor backend names registered over gloo: xtp's real init path, real collectives ----


def _init_aliased(name: str):
    fakes.alias_backend_over_gloo(name)
    ctx = xtp.init_distributed()
    out = _describe(ctx)
    out["torch_backend"] = dist.get_backend()
    comm = ctx.communicator()
    gathered = comm.all_gather(torch.full((ctx.rank + 1, 2), float(ctx.rank)), 0, [1, 2])
    out["gathered"] = gathered[:, 0].tolist()
    b = torch.full((2,), float(ctx.rank))
    comm.broadcast(b, src=1)
    out["broadcast"] = b.tolist()
    return out


@pytest.mark.parametrize("name", ["hccl", "xccl", "ccl"])
def test_init_path_with_backend_name_aliased_over_gloo(name):
    results = spawn(_init_aliased, 2, args=(name,), env={**CPU, "XTP_DIST_BACKEND": name})
    for rank, out in enumerate(results):
        assert out["backend"] == name and out["torch_backend"] == name
        assert out["tp"] == (rank, 2) and out["tp_sum"] == 3
        assert out["gathered"] == [0.0, 1.0, 1.0] and out["broadcast"] == [1.0, 1.0]


def _init_fake_vendor(name: str):
    """A rank on a fake vendor stack: the fake vendor import registers its backend over gloo."""
    fakes.enter_vendor_root()
    if name == "hpu":
        from xtp.accelerators.devices.hpu import HpuAccelerator

        HpuAccelerator.device_node_globs = tuple(
            __import__("os").environ["XTP_FAKE_NODE_GLOBS"].split("|"))
    else:
        fakes.install_fake_xpu_runtime(count=2)
        if name == "xpu-xccl":
            fakes.alias_backend_over_gloo("xccl")
    ctx = xtp.init_distributed()
    out = _describe(ctx)
    out["torch_backend"] = dist.get_backend()
    return out


@pytest.mark.parametrize(
    ("name", "accelerator", "backend", "vendor_import"),
    [
        ("hpu", "hpu", "hccl", "habana_frameworks.torch.distributed.hccl"),
        ("xpu-ccl", "xpu", "ccl", "oneccl_bindings_for_pytorch"),
        ("xpu-xccl", "xpu", "xccl", None),
    ],
)
def test_init_path_with_fake_vendor_stack_aliased_over_gloo(
    tmp_path, name, accelerator, backend, vendor_import
):
    """XTP_ACCELERATOR=hpu/xpu on fake vendor packages: xtp binds ``hpu:N``/``xpu:N``, picks the
    default backend, does the vendor import that registers it, and runs real collectives."""
    root = fakes.write_vendor_packages(tmp_path / "vendor")
    log = tmp_path / "imports.log"
    globs = fakes.write_gaudi_nodes(tmp_path / "dev", 2)
    env = fakes.vendor_env(root, log, XTP_ACCELERATOR=accelerator,
                           XTP_FAKE_NODE_GLOBS="|".join(globs))
    results = spawn(_init_fake_vendor, 2, args=(name,), env=env)
    for rank, out in enumerate(results):
        assert out["accelerator"] == accelerator and out["device"] == f"{accelerator}:{rank}"
        assert out["backend"] == backend and out["torch_backend"] == backend
        assert out["tp_sum"] == 3
    imported = fakes.imported_log(log)
    if vendor_import:
        assert vendor_import in imported
    assert "intel_extension_for_pytorch" not in imported
    if accelerator == "xpu":
        assert not any(m.startswith("habana") for m in imported)
