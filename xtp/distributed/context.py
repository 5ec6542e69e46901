"""Where this process sits in the world: :class:`TPContext` (made by :func:`xtp.init_distributed`).

World layout: ``world_size = tp_size x dp_size``. Consecutive global ranks form one TP group
(ranks ``[k*tp, (k+1)*tp)``), and ranks with the same TP rank form one data-parallel group.
Across several machines each TP group stays inside one node and the data-parallel groups span
the nodes (:mod:`xtp.distributed.topology`; ``ctx.describe()`` says which ranks run where).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..accelerators import Accelerator, Communicator, SoloCommunicator
from ..accelerators.comm.failures import guarded
from .topology import Topology


@dataclass(frozen=True, kw_only=True)
class TPContext:
    """Where this process sits: its device, its TP group and its data-parallel group.

    Built by keyword. ``rank``/``world_size`` are global, ``local_rank`` is the launcher's
    ``LOCAL_RANK``; ``tp_rank``/``dp_rank`` are group-local. ``tp_group``/``dp_group`` are
    ``None`` when the group has one member (no collective is ever issued on it). ``backend``
    is ``None`` in a single process without a process group; ``timeout`` bounds every
    collective. ``topology`` says which global ranks form each TP group and on which host
    (``None`` where no identities were exchanged).
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
    topology: Topology | None = None
    _comm: list = field(default_factory=list, compare=False, repr=False)

    def communicator(self) -> Communicator:
        """The Communicator on the TP group (the accelerator's fastest one; a
        :class:`~xtp.accelerators.SoloCommunicator` at tp 1), created once per context:
        creating one can be collective (shared-memory setup) and costs a segment."""
        if not self._comm:
            if self.tp_size == 1:
                self._comm.append(SoloCommunicator())
            else:
                with guarded("creating the TP group's communicator", self.tp_group):
                    self._comm.append(self.accelerator.communicator(self.tp_group))
        return self._comm[0]

    def describe(self) -> str:
        """Which global ranks form each TP group and on which host, then this rank's place."""
        me = (f"this is global rank {self.rank} of {self.world_size}: tp rank {self.tp_rank} "
              f"of {self.tp_size}, dp rank {self.dp_rank} of {self.dp_size}")
        return f"{self.topology.describe()}\n{me}" if self.topology is not None else me
