"""``xtp.init_distributed``: one process group per TP replica, from torchrun, a group or a mesh.

Four paths, one function each:

* a single process without a launcher (no ``RANK``/``WORLD_SIZE``): ``tp_size == 1`` and no
  process group at all (:func:`_single_process`);
* under a launcher, torch.distributed not yet initialised: start the process group
  (:func:`_start_process_group`), then split the world;
* an existing group or ``DeviceMesh``: adopt it as the TP (and DP) group (:func:`_adopt`);
* otherwise split the world into TP and DP groups (:func:`_split_world`): consecutive global
  ranks form one TP group, ranks with the same TP rank one DP group
  (:mod:`xtp.distributed.context` has the layout). Over several nodes each TP group must stay
  inside one node unless cross-node tp is asked for (:mod:`xtp.distributed.topology`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..accelerators import Accelerator, get_accelerator, resolve_dist_backend
from ..accelerators.comm.failures import group_ranks, guarded, known_peers
from ..accelerators.cpu.placement import place_rank_if_asked
from ..accelerators.env import cross_node_tp, timeout_seconds
from ..accelerators.errors import EnvSettingError
from ..errors import DistributedSetupError, TPSizeError
from ..models.inputs import check_tp_size
from .consistency import exchange_identities
from .context import TPContext
from .failures import setup_failure
from .topology import Topology, check_placement


def default_timeout() -> timedelta:
    """``XTP_TIMEOUT`` seconds, else 300 s (torch's own default is 30 minutes).

    Raises:
        DistributedSetupError: ``XTP_TIMEOUT`` is not a positive number of seconds.
    """
    try:
        return timedelta(seconds=timeout_seconds())
    except EnvSettingError as exc:
        raise DistributedSetupError(str(exc)) from None


@dataclass(frozen=True)
class _Process:
    """What every path knows about this process before the groups are chosen."""

    accelerator: Accelerator
    device: torch.device
    local_rank: int
    backend: str | None
    timeout: timedelta

    def context(self, **layout) -> TPContext:
        """The :class:`TPContext` of this process with ``layout`` (ranks, sizes, groups)."""
        return TPContext(accelerator=self.accelerator, device=self.device,
                         local_rank=self.local_rank, backend=self.backend,
                         timeout=self.timeout, **layout)


def init_distributed(
    tp_size: int | None = None,
    *,
    accelerator: str | Accelerator | None = None,
    backend: str | None = None,
    group: dist.ProcessGroup | None = None,
    mesh=None,
    timeout: timedelta | float | None = None,
    allow_cross_node_tp: bool | None = None,
) -> TPContext:
    """Set up (or adopt) torch.distributed and return this process's :class:`TPContext`.

    Under a launcher with ``XTP_PIN=1`` (or ``smt``) on the CPU, this rank is first pinned to
    its own physical cores and runs one thread on each
    (:func:`xtp.accelerators.cpu.placement.place_this_rank`); ``xtp run`` sets it for the
    ranks it starts, a user's own ``torchrun`` ranks are left alone unless asked.

    Args:
        tp_size: ranks per TP group; default: the whole world (or the size of ``group``).
        accelerator: registry name or instance; default: ``XTP_ACCELERATOR`` or detected.
        backend: collective backend; default: ``XTP_DIST_BACKEND`` or the accelerator's.
        group: an existing process group to use as the TP group.
        mesh: an existing ``DeviceMesh`` with a ``"tp"`` dimension (and optionally ``"dp"``).
        timeout: collective timeout (seconds or timedelta); default :func:`default_timeout`.
        allow_cross_node_tp: let a TP group span nodes (slow: a warning names the cost);
            default ``XTP_CROSS_NODE_TP``, else no.

    Raises:
        TPSizeError: ``tp_size`` is < 1, does not divide the world size, or (over several
            nodes, without ``allow_cross_node_tp``) does not divide the ranks per node.
        DistributedSetupError: tp_size > 1 without a launcher, a bad group/mesh, or ranks
            that did not all reach the rendezvous within ``timeout`` (the message says how
            many arrived).
        RanksDisagreeError: the ranks asked for different tp_size or run different xtp/torch
            versions (checked with one small all-gather that also records every rank's host
            and pid, so a later failed collective can name a dead rank, and places the TP
            groups on the nodes).
    """
    acc = get_accelerator(accelerator)
    if timeout is None:
        timeout = default_timeout()
    elif not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    if tp_size is not None:
        check_tp_size(tp_size)
    if allow_cross_node_tp is None:
        try:
            allow_cross_node_tp = cross_node_tp()
        except EnvSettingError as exc:
            raise DistributedSetupError(str(exc)) from None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if _under_launcher():  # XTP_PIN=1 (set by xtp run for its ranks): this rank on its cores
        try:
            place_rank_if_asked(acc, local_rank, int(os.environ.get(
                "LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
        except EnvSettingError as exc:
            raise DistributedSetupError(str(exc)) from None

    if not dist.is_initialized():
        if group is not None or mesh is not None:
            raise DistributedSetupError(
                "a group or mesh was given but torch.distributed is not initialised")
        if not _under_launcher():
            return _single_process(acc, tp_size, local_rank, timeout)
        proc = _start_process_group(acc, backend, local_rank, timeout)
    else:
        proc = _Process(acc, _bind_device(acc, local_rank), local_rank, dist.get_backend(),
                        timeout)
    if group is not None or mesh is not None:
        return _adopt(proc, tp_size, group, mesh, allow_cross_node_tp)
    return _split_world(proc, tp_size, allow_cross_node_tp)


def _under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _bind_device(acc: Accelerator, local_rank: int) -> torch.device:
    count = acc.device_count()
    index = local_rank % count if count else 0
    acc.set_device(index)
    return acc.device(index)


def _single_process(acc: Accelerator, tp_size: int | None, local_rank: int,
                    timeout: timedelta) -> TPContext:
    """A plain ``python script.py``: tp 1, no process group (none is created)."""
    if tp_size not in (None, 1):
        raise DistributedSetupError(
            f"tp_size={tp_size} needs {tp_size} processes, but this is a single process "
            f"(no RANK/WORLD_SIZE in the environment). Launch with `torchrun "
            f"--nproc-per-node {tp_size} your_script.py` or `xtp run --tp {tp_size}`"
        )
    proc = _Process(acc, _bind_device(acc, local_rank), local_rank, None, timeout)
    return proc.context(rank=0, world_size=1, tp_rank=0, tp_size=1, tp_group=None,
                        dp_rank=0, dp_size=1, dp_group=None,
                        topology=Topology.build(1, [(0,)], {}))


def _start_process_group(acc: Accelerator, backend: str | None, local_rank: int,
                         timeout: timedelta) -> _Process:
    """Bind this rank's device and ``init_process_group`` from the launcher's environment;
    a failed rendezvous raises :func:`~xtp.distributed.failures.setup_failure`'s error."""
    backend = resolve_dist_backend(acc, backend)
    device = _bind_device(acc, local_rank)
    kwargs = {}
    if backend == acc.default_dist_backend() and acc.init_device_id(0) is not None:
        kwargs["device_id"] = device
    try:
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    except Exception as exc:
        raise setup_failure(backend, exc, timeout) from exc
    return _Process(acc, device, local_rank, backend, timeout)


def _adopt(proc: _Process, tp_size: int | None, group: dist.ProcessGroup | None,
           mesh, allow_cross_node: bool) -> TPContext:
    """Use ``group`` (or ``mesh``'s ``"tp"`` dimension, and its ``"dp"`` one if any) as the
    TP (and DP) group. A given group that spans nodes was asked for: a warning, never an
    error."""
    dp_group = None
    if mesh is not None:
        names = tuple(mesh.mesh_dim_names or ())
        if "tp" not in names:
            raise DistributedSetupError(f"the DeviceMesh needs a 'tp' dimension; it has {names}")
        group = mesh.get_group("tp")
        dp_group = mesh.get_group("dp") if "dp" in names else None
    size = dist.get_world_size(group)
    if tp_size is not None and tp_size != size:
        raise TPSizeError(f"tp_size={tp_size} but the given group has {size} ranks")
    topology = None
    if size > 1:
        exchange_identities(group, tp_size, proc.timeout)
        topology = Topology.build(dist.get_world_size(), [group_ranks(group)], known_peers())
        check_placement(topology, size, allow_cross_node=True)
    dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
    return proc.context(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        tp_rank=dist.get_rank(group), tp_size=size, tp_group=group if size > 1 else None,
        dp_rank=dist.get_rank(dp_group) if dp_group is not None else 0, dp_size=dp_size,
        dp_group=dp_group if dp_size > 1 else None, topology=topology,
    )


def _split_world(proc: _Process, tp_size: int | None, allow_cross_node: bool) -> TPContext:
    """Split the world into TP groups of ``tp_size`` (default: the whole world) and DP groups,
    after checking their placement on the nodes (:func:`check_placement`); collective over
    the world."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world > 1:
        exchange_identities(None, tp_size, proc.timeout)
    tp = world if tp_size is None else tp_size
    if world % tp:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise TPSizeError(
            f"tp_size={tp} does not divide the world size {world}; choose one of {divisors}"
        )
    topology = Topology.build(world, [range(k, k + tp) for k in range(0, world, tp)],
                              known_peers())
    check_placement(topology, tp, allow_cross_node)
    with guarded("creating the TP and DP process groups"):
        tp_group, dp_group = _split_groups(world, rank, tp, proc.timeout)
    return proc.context(
        rank=rank, world_size=world, tp_rank=rank % tp, tp_size=tp,
        tp_group=tp_group if tp > 1 else None, dp_rank=rank // tp, dp_size=world // tp,
        dp_group=dp_group, topology=topology,
    )


def _split_groups(world: int, rank: int, tp_size: int, timeout: timedelta):
    """Create every TP and DP group (all ranks must take part) and return this rank's."""
    dp_size = world // tp_size
    tp_group = dp_group = None
    if tp_size == world:
        tp_group = dist.group.WORLD
    else:
        for k in range(dp_size):
            ranks = list(range(k * tp_size, (k + 1) * tp_size))
            g = dist.new_group(ranks, timeout=timeout) if tp_size > 1 else None
            if rank in ranks:
                tp_group = g
    if dp_size > 1:
        for t in range(tp_size):
            ranks = list(range(t, world, tp_size))
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                dp_group = g
    return tp_group, dp_group
