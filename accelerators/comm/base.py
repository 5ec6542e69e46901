"""Collectives on one process group, as the xtp core needs them.

:class:`Communicator` is the interface; :class:`TorchCommunicator` implements it over
``torch.distributed`` for any backend. With a group of size 1 (or no process group at all)
every operation is a no-op that issues no collective. Ranks are *group-local* throughout.

Shapes: ``all_gather(x, dim, sizes)`` takes this rank's ``x`` whose extent along ``dim`` is
``sizes[rank]`` and returns the concatenation along ``dim`` of every rank's piece
(extent ``sum(sizes)``); ``reduce_scatter`` is its reverse with a sum.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..errors import XtpError
from .failures import collective_failure


class Communicator(abc.ABC):
    """Collectives on one process group. Implementations must be usable from any thread that
    runs the model's forward pass, and must issue no collective when ``world_size == 1``."""

    group: dist.ProcessGroup | None

    @property
    @abc.abstractmethod
    def world_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def rank(self) -> int: ...

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group, in place; returns ``tensor``."""

    @abc.abstractmethod
    def all_gather(
        self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim``; ``sizes`` gives each rank's extent
        along ``dim`` when they differ (``None``: all equal). Returns a new tensor."""

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy group rank ``src``'s ``tensor`` into every rank's ``tensor``, in place."""

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of ``tensor`` over the group, in place; returns ``tensor``
        (what a vocab-parallel softmax needs). The default gathers every rank's tensor along a
        new leading dimension (correct on every backend)."""
        if self.world_size == 1:
            return tensor
        return tensor.copy_(self.all_gather(tensor.unsqueeze(0), dim=0).amax(dim=0))

    def reduce_scatter(
        self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Sum ``tensor`` over the group and return this rank's piece along ``dim``.

        The default is an all-reduce followed by a slice (correct on every backend)."""
        sizes = split_sizes(tensor.shape[dim], self.world_size, sizes)
        reduced = self.all_reduce(tensor.clone())
        start = sum(sizes[: self.rank])
        return reduced.narrow(dim, start, sizes[self.rank]).contiguous()

    def barrier(self) -> None:
        """Wait until every rank of the group arrives."""


def split_sizes(total: int, world: int, sizes: Sequence[int] | None) -> list[int]:
    """Each rank's extent of a dimension of ``total`` split over ``world`` ranks: ``sizes``
    checked, or equal pieces when ``None``; ``ValueError`` when they do not split ``total``."""
    if sizes is None:
        if total % world:
            raise ValueError(f"extent {total} does not divide over {world} ranks; pass sizes=")
        return [total // world] * world
    sizes = list(sizes)
    if len(sizes) != world or sum(sizes) != total:
        raise ValueError(f"sizes {sizes} do not split extent {total} over {world} ranks")
    return sizes


class TorchCommunicator(Communicator):
    """Collectives through ``torch.distributed`` on ``group`` (``None``: the default group, or a
    single process when torch.distributed is not initialised).

    A collective that fails in torch (a peer died, a timeout) raises
    :class:`~xtp.accelerators.errors.CollectiveError` (or its subclass
    ``CollectiveTimeoutError``) naming the rank at fault
    (:mod:`xtp.accelerators.comm.failures`)."""

    _seq = 0  # collectives issued on this communicator (the same on every rank)

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self._world = dist.get_world_size(group)
            self._rank = dist.get_rank(group)
        else:
            if group is not None:
                raise ValueError(
                    "a process group was given but torch.distributed is not initialised"
                )
            self._world, self._rank = 1, 0

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def rank(self) -> int:
        return self._rank

    def _failed(self, op: str, exc: RuntimeError) -> XtpError:
        return collective_failure(op, self.group, exc, self._seq)

    def _all_reduce(self, tensor: torch.Tensor, op, name: str) -> torch.Tensor:
        if self._world == 1:
            return tensor
        self._seq += 1
        try:
            if tensor.is_contiguous():
                dist.all_reduce(tensor, op=op, group=self.group)
            else:
                buf = tensor.contiguous()
                dist.all_reduce(buf, op=op, group=self.group)
                tensor.copy_(buf)
        except RuntimeError as exc:
            raise self._failed(name, exc) from exc
        return tensor

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM, "all_reduce")

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.MAX, "all_reduce_max")

    def all_gather(
        self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        if self._world == 1:
            return tensor.clone()
        dim = dim % tensor.dim()
        local = tensor.movedim(dim, 0)
        if sizes is None:
            sizes = [local.shape[0]] * self._world
        sizes = list(sizes)
        if len(sizes) != self._world or sizes[self._rank] != local.shape[0]:
            raise ValueError(
                f"rank {self._rank}: sizes {sizes} do not match local extent {local.shape[0]} "
                f"over {self._world} ranks"
            )
        width = max(sizes)
        if local.shape[0] < width:
            pad = local.new_zeros((width - local.shape[0], *local.shape[1:]))
            local = torch.cat([local, pad], 0)
        local = local.contiguous()
        out = local.new_empty((width * self._world, *local.shape[1:]))
        # newer torch deprecates all_gather_into_tensor (a FutureWarning per call) in favour
        # of all_gather_single, which older torch lacks
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._seq += 1
        try:
            gather(out, local, group=self.group)
        except RuntimeError as exc:
            raise self._failed("all_gather", exc) from exc
        pieces = [out.narrow(0, r * width, n) for r, n in enumerate(sizes)]
        return torch.cat(pieces, 0).movedim(0, dim).contiguous()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self._world == 1:
            return tensor
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        self._seq += 1
        try:
            dist.broadcast(buf, src=global_src, group=self.group)
        except RuntimeError as exc:
            raise self._failed("broadcast", exc) from exc
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def barrier(self) -> None:
        if self._world > 1:
            self._seq += 1
            try:
                dist.barrier(group=self.group)
            except RuntimeError as exc:
                raise self._failed("barrier", exc) from exc
