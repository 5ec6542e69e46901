"""Distributed setup: one process group per TP replica, from torchrun, a group or a DeviceMesh.

World layout: ``world_size = tp_size x dp_size``. Consecutive global ranks form one TP group
(ranks ``[k*tp, (k+1)*tp)``), and ranks with the same TP rank form one data-parallel group.
A single process without torchrun gets ``tp_size == 1`` and no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .accelerators import (
    Accelerator,
    Communicator,
    TorchCommunicator,
    get_accelerator,
    resolve_dist_backend,
)
from .errors import DistributedSetupError, TPSizeError

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
            self._comm.append(_SoloCommunicator() if self.tp_size == 1
                              else self.accelerator.communicator(self.tp_group))
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
        DistributedSetupError: tp_size > 1 without a launcher, or a bad group/mesh.
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
            raise DistributedSetupError(
                f"could not create the {backend!r} process group (rank "
                f"{os.environ.get('RANK')}/{os.environ.get('WORLD_SIZE')}, "
                f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {exc}"
            ) from exc
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
        dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        return TPContext(
            acc, device, rank, world, local_rank, dist.get_rank(group), size,
            group if size > 1 else None,
            dist.get_rank(dp_group) if dp_group is not None else 0, dp_size,
            dp_group if dp_size > 1 else None, backend, timeout,
        )

    tp = world if tp_size is None else tp_size
    if world % tp:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise TPSizeError(
            f"tp_size={tp} does not divide the world size {world}; choose one of {divisors}"
        )
    tp_group, dp_group = _split_groups(world, rank, tp, timeout)
    return TPContext(
        acc, device, rank, world, local_rank, rank % tp, tp,
        tp_group if tp > 1 else None, rank // tp, world // tp,
        dp_group, backend, timeout,
    )
