"""A Communicator wrapper that records every collective (for tests and ``xtp plan`` checks)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import Communicator


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective call: its name, the local input's shape and dtype, and its bytes."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


class CountingCommunicator(Communicator):
    """Delegates to ``inner`` and appends a :class:`CollectiveRecord` per call that would issue a
    collective (none when ``world_size == 1``)."""

    def __init__(self, inner: Communicator) -> None:
        self.inner = inner
        self.group = inner.group
        self.records: list[CollectiveRecord] = []

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    @property
    def rank(self) -> int:
        return self.inner.rank

    def _record(self, op: str, tensor: torch.Tensor) -> None:
        if self.inner.world_size > 1:
            self.records.append(
                CollectiveRecord(op, tuple(tensor.shape), tensor.dtype,
                                 tensor.numel() * tensor.element_size())
            )

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._record("all_reduce", tensor)
        return self.inner.all_reduce(tensor)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        self._record("all_reduce_max", tensor)
        return self.inner.all_reduce_max(tensor)

    def all_gather(
        self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        self._record("all_gather", tensor)
        return self.inner.all_gather(tensor, dim, sizes)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._record("broadcast", tensor)
        return self.inner.broadcast(tensor, src)

    def reduce_scatter(
        self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        self._record("reduce_scatter", tensor)
        return self.inner.reduce_scatter(tensor, dim, sizes)

    def barrier(self) -> None:
        self.inner.barrier()

    def counts(self) -> Counter:
        """``Counter`` of op name -> number of calls."""
        return Counter(r.op for r in self.records)

    def clear(self) -> None:
        self.records.clear()
