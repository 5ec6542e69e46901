"""The communicator of a group of one rank: every collective is a local no-op.

:class:`SoloCommunicator` serves a TP group of size 1, also inside an initialised world (tp 1
with data parallelism, where the default group has several ranks and must not be used). It
issues no ``torch.distributed`` call and needs no process group. Each operation returns what
:class:`~xtp.accelerators.comm.base.TorchCommunicator` returns on a group of one rank:

* ``all_reduce(x)`` and ``broadcast(x)``: ``x`` itself (the sum over one rank, in place);
* ``all_gather(x, dim, sizes)``: a copy of ``x`` (the concatenation of one piece);
* ``reduce_scatter(x, dim, sizes)``: a contiguous copy of ``x`` (this rank's piece is all of it;
  ``sizes``, when given, must be ``[x.shape[dim]]``);
* ``barrier()``: returns at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from typing_extensions import override

from .base import Communicator, split_sizes


class SoloCommunicator(Communicator):
    """Collectives over a group of one rank (group rank 0 of 1); see the module docstring."""

    def __init__(self) -> None:
        self.group = None

    @property
    @override
    def world_size(self) -> int:
        return 1

    @property
    @override
    def rank(self) -> int:
        return 0

    @override
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @override
    def all_gather(
        self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        return tensor.clone()

    @override
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    @override
    def reduce_scatter(
        self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        split_sizes(tensor.shape[dim], 1, sizes)
        return tensor.clone().contiguous()

    @override
    def barrier(self) -> None:
        return None

    def __repr__(self) -> str:
        return "<SoloCommunicator rank 0/1>"
