"""Distributed setup: one process group per TP replica, from torchrun, a group or a DeviceMesh.

World layout: ``world_size = tp_size x dp_size``. Consecutive global ranks form one TP group
(ranks ``[k*tp, (k+1)*tp)``), and ranks with the same TP rank form one data-parallel group.
A single process without torchrun gets ``tp_size == 1`` and no process group at all.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..accelerators import (
    Accelerator,
    Communicator,
    TorchCommunicator,
    get_accelerator,
    resolve_dist_backend,
)
from ..accelerators.comm.failures import guarded, record_peers
from ..errors import DistributedSetupError, RanksDisagreeError, TPSizeError

ENV_TIMEOUT = "XTP_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class TPContext:
    """Where this process sits: its device, its TP group and its data-parallel group.

    ``tp_rank``/``dp_rank`` are group-local. ``tp_group``/``dp_group`` are ``None`` when the
    group has one member (no collective is ever issued on it).
    """

    accelerator: Accelerator
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    tp_group: dist.ProcessGroup | None
    dp_rank: int
    dp_size: int
    dp_group: dist.ProcessGroup | None
    backend: str | None
    timeout: timedelta
    _comm: list = field(default_factory=list, compare=False, repr=False)

    def communicator(self) -> Communicator:
        """The Communicator on the TP group (the accelerator's fastest one), created once per
        context: creating one can be collective (shared-memory setup) and costs a segment."""
        if not self._comm:
            if self.tp_size == 1:
                self._comm.append(_SoloCommunicator())
            else:
                with guarded("creating the TP group's communicator", self.tp_group):
                    self._comm.append(self.accelerator.communicator(self.tp_group))
        return self._comm[0]


class _SoloCommunicator(TorchCommunicator):
    """A one-member group inside an initialised world: every collective is a no-op."""

    def __init__(self) -> None:
        self.group = None
        self._world, self._rank = 1, 0


def default_timeout() -> timedelta:
    """``XTP_TIMEOUT`` seconds, else 300 s (torch's own default is 30 minutes)."""
    raw = os.environ.get(ENV_TIMEOUT, "").strip()
    if not raw:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        raise DistributedSetupError(
            f"{ENV_TIMEOUT}={raw!r} is not a number of seconds; set e.g. {ENV_TIMEOUT}=120"
        ) from None
    if seconds <= 0:
        raise DistributedSetupError(f"{ENV_TIMEOUT} must be positive, got {raw!r}")
    return timedelta(seconds=seconds)


def _under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _bind_device(acc: Accelerator, local_rank: int) -> torch.device:
    count = acc.device_count()
    index = local_rank % count if count else 0
    acc.set_device(index)
    return acc.device(index)


def _setup_failure(backend: str, exc: Exception, timeout: timedelta) -> DistributedSetupError:
    """A one-paragraph account of a failed ``init_process_group``: how many ranks arrived."""
    env = os.environ
    rank, world = env.get("RANK"), env.get("WORLD_SIZE")
    where = f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"
    text = str(exc)
    reason = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    secs = f"{timeout.total_seconds():g} s"
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    if joined:
        came, want = int(joined[1]), int(joined[2])
        what = (f"only {came} of {want} ranks reached the rendezvous at {where} within {secs} "
                f"(this is rank {rank}); the other {want - came} never called "
                "init_distributed: they crashed or hang before it (see their output), were "
                "not started, or use another MASTER_ADDR/MASTER_PORT")
    elif "connect" in text.lower() and ("timed out" in text.lower() or "refused" in text):
        what = (f"rank {rank} of {world} could not reach the rendezvous at {where} within "
                f"{secs}: rank 0, which hosts it, did not start, died, or listens elsewhere "
                "(check MASTER_ADDR/MASTER_PORT and rank 0's output)")
    elif "connection was likely closed" in text.lower() or "failed to recv" in text.lower():
        what = (f"rank {rank} of {world} lost the rendezvous at {where} while waiting for the "
                f"other ranks: rank 0, which hosts it, gave up (rank 0's error says how many "
                "ranks arrived) or died")
    elif "wait timeout" in text.lower() or "timed out" in text.lower():
        what = (f"rank {rank} of {world} waited {secs} at the rendezvous ({where}) for the "
                f"other ranks; not all {world} arrived (rank 0's error says how many did): the "
                "missing ones crashed or hang before init_distributed (see their output)")
    else:
        what = (f"could not create the {backend!r} process group (rank {rank}/{world}, "
                f"MASTER_ADDR={env.get('MASTER_ADDR')}, MASTER_PORT={env.get('MASTER_PORT')}); "
                f"{world} ranks were expected")
    return DistributedSetupError(f"{what}. Set XTP_TIMEOUT to wait longer. (torch: {reason})")


def _exchange_identities(group, tp_size: int | None, timeout: timedelta) -> None:
    """Record every rank's host and pid (for naming a failed rank later) and check the ranks
    agree on the TP size and the software versions; collective over ``group``."""
    from .._version import __version__
    from .consistency import disagreement

    mine = {"tp_size": str(tp_size or dist.get_world_size(group)), "xtp version": __version__,
            "torch version": torch.__version__}
    detail = disagreement(record_peers(group, mine, timeout.total_seconds()))
    if detail:
        raise RanksDisagreeError(
            f"the ranks disagree at init_distributed on {detail}: start every rank with the "
            "same tp_size and the same installed software")


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


def init_distributed(
    tp_size: int | None = None,
    *,
    accelerator: str | Accelerator | None = None,
    backend: str | None = None,
    group: dist.ProcessGroup | None = None,
    mesh=None,
    timeout: timedelta | float | None = None,
) -> TPContext:
    """Set up (or adopt) torch.distributed and return this process's :class:`TPContext`.

    Args:
        tp_size: ranks per TP group; default: the whole world (or the size of ``group``).
        accelerator: registry name or instance; default: ``XTP_ACCELERATOR`` or detected.
        backend: collective backend; default: ``XTP_DIST_BACKEND`` or the accelerator's.
        group: an existing process group to use as the TP group.
        mesh: an existing ``DeviceMesh`` with a ``"tp"`` dimension (and optionally ``"dp"``).
        timeout: collective timeout (seconds or timedelta); default :func:`default_timeout`.

    Raises:
        TPSizeError: ``tp_size`` is < 1 or does not divide the world size.
        DistributedSetupError: tp_size > 1 without a launcher, a bad group/mesh, or ranks
            that did not all reach the rendezvous within ``timeout`` (the message says how
            many arrived).
        RanksDisagreeError: the ranks asked for different tp_size or run different xtp/torch
            versions (checked with one small all-gather that also records every rank's host
            and pid, so a later failed collective can name a dead rank).
    """
    acc = get_accelerator(accelerator)
    if timeout is None:
        timeout = default_timeout()
    elif not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    if tp_size is not None and (not isinstance(tp_size, int) or tp_size < 1):
        raise TPSizeError(f"tp_size must be a positive integer, got {tp_size!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    if not dist.is_initialized() and (group is not None or mesh is not None):
        raise DistributedSetupError(
            "a group or mesh was given but torch.distributed is not initialised"
        )
    if not dist.is_initialized() and not _under_launcher():
        if tp_size not in (None, 1):
            raise DistributedSetupError(
                f"tp_size={tp_size} needs {tp_size} processes, but this is a single process "
                f"(no RANK/WORLD_SIZE in the environment). Launch with `torchrun "
                f"--nproc-per-node {tp_size} your_script.py` or `xtp run --tp {tp_size}`"
            )
        device = _bind_device(acc, local_rank)
        return TPContext(acc, device, 0, 1, local_rank, 0, 1, None, 0, 1, None, None, timeout)

    if not dist.is_initialized():
        backend = resolve_dist_backend(acc, backend)
        device = _bind_device(acc, local_rank)
        kwargs = {}
        if backend == acc.default_dist_backend() and acc.init_device_id(0) is not None:
            kwargs["device_id"] = device
        try:
            dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
        except Exception as exc:
            raise _setup_failure(backend, exc, timeout) from exc
    else:
        device = _bind_device(acc, local_rank)
        backend = dist.get_backend()
    world, rank = dist.get_world_size(), dist.get_rank()

    if mesh is not None:
        names = tuple(mesh.mesh_dim_names or ())
        if "tp" not in names:
            raise DistributedSetupError(f"the DeviceMesh needs a 'tp' dimension; it has {names}")
        group = mesh.get_group("tp")
        dp_group = mesh.get_group("dp") if "dp" in names else None
    else:
        dp_group = None
    if group is not None:
        size = dist.get_world_size(group)
        if tp_size is not None and tp_size != size:
            raise TPSizeError(f"tp_size={tp_size} but the given group has {size} ranks")
        if size > 1:
            _exchange_identities(group, tp_size, timeout)
        dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        return TPContext(
            acc, device, rank, world, local_rank, dist.get_rank(group), size,
            group if size > 1 else None,
            dist.get_rank(dp_group) if dp_group is not None else 0, dp_size,
            dp_group if dp_size > 1 else None, backend, timeout,
        )

    if world > 1:
        _exchange_identities(None, tp_size, timeout)
    tp = world if tp_size is None else tp_size
    if world % tp:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise TPSizeError(
            f"tp_size={tp} does not divide the world size {world}; choose one of {divisors}"
        )
    with guarded("creating the TP and DP process groups"):
        tp_group, dp_group = _split_groups(world, rank, tp, timeout)
    return TPContext(
        acc, device, rank, world, local_rank, rank % tp, tp,
        tp_group if tp > 1 else None, rank // tp, world // tp,
        dp_group, backend, timeout,
    )
