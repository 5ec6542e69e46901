"""Single-process tensor parallelism for unit tests: ``tp`` threads play the ranks.

Tier: in-process emulation. Each thread holds its own deep copy of the model, sharded by
:func:`xtp.shard` with a fake :class:`~xtp.TPContext` (group-local rank ``r`` of ``tp``) and
a :class:`ThreadCommunicator` whose collectives meet at a barrier. No process group, no
backend: this checks the *plan* (which rows each rank owns, which attributes change) against
the unsharded model numerically, cheaply. It is not a substitute for the real-process parity
suite (tests/test_parity.py), which proves the collectives themselves.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import threading
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from xtp.accelerators import Communicator

TIMEOUT_S = 60.0


class Meeting:
    """Shared state of ``tp`` thread-ranks: one slot per rank and a barrier."""

    def __init__(self, tp: int) -> None:
        self.tp = tp
        self.slots: list[torch.Tensor | None] = [None] * tp
        self.barrier = threading.Barrier(tp, timeout=TIMEOUT_S)

    def exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = tensor.detach().clone()
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return got


class ThreadCommunicator(Communicator):
    """Collectives between threads of one process (sum in rank order: deterministic)."""

    def __init__(self, meeting: Meeting, rank: int) -> None:
        self.group = None
        self._meeting, self._rank = meeting, rank
        self.calls: list[str] = []

    @property
    def world_size(self) -> int:
        return self._meeting.tp

    @property
    def rank(self) -> int:
        return self._rank

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls.append("all_reduce")
        pieces = self._meeting.exchange(self._rank, tensor)
        total = pieces[0].clone()
        for p in pieces[1:]:
            total += p
        tensor.copy_(total)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1,
                   sizes: Sequence[int] | None = None) -> torch.Tensor:
        self.calls.append("all_gather")
        return torch.cat(self._meeting.exchange(self._rank, tensor), dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self.calls.append("broadcast")
        tensor.copy_(self._meeting.exchange(self._rank, tensor)[src])
        return tensor


class _FakeAccelerator:
    """Just enough of an Accelerator for ``TPContext.communicator()``."""

    def __init__(self, comm: Communicator) -> None:
        self._comm = comm

    def communicator(self, group) -> Communicator:
        return self._comm


def fake_context(tp: int, rank: int, comm: Communicator):
    """A :class:`~xtp.TPContext` saying "rank ``rank`` of ``tp``" on the CPU, with no group."""
    import xtp

    solo = xtp.init_distributed()  # single process: tp 1, no process group
    return dataclasses.replace(solo, accelerator=_FakeAccelerator(comm), device=torch.device("cpu"),
                               tp_rank=rank, tp_size=tp, tp_group=None)


@contextlib.contextmanager
def group_checks_recorded() -> Iterator[list]:
    """shard() at tp > 1 all-gathers a fingerprint of the model over the process group, which
    a fake context has not got: record the fingerprints instead (the caller compares them)."""
    shard_module = importlib.import_module("xtp.sharding.api")
    seen: list = []
    original = getattr(shard_module, "check_fingerprints", None)
    if original is None:
        yield seen
        return
    shard_module.check_fingerprints = lambda mine, group: seen.append(mine)
    try:
        yield seen
    finally:
        shard_module.check_fingerprints = original


def run_sharded(model: nn.Module, tp: int, fn: Callable[[nn.Module], object],
                rules: dict[str, str] | None = None, plan=None) -> list:
    """Shard a deep copy of ``model`` for every rank of ``tp`` and call ``fn(copy)`` on each, all
    ranks at once in threads; returns the per-rank results (``model`` itself is untouched)."""
    import xtp

    meeting = Meeting(tp)
    results: list = [None] * tp
    errors: list[BaseException] = []
    replicas = []
    with group_checks_recorded() as fingerprints:
        for r in range(tp):
            comm = ThreadCommunicator(meeting, r)
            replica = copy.deepcopy(model)
            xtp.shard(replica, rules=rules, plan=plan, context=fake_context(tp, r, comm))
            replicas.append(replica)
    assert all(fp == fingerprints[0] for fp in fingerprints), "ranks disagree"

    def work(r: int) -> None:
        try:
            with torch.no_grad():
                results[r] = fn(replicas[r])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            meeting.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * 2)
    if errors:
        raise errors[0]
    return results


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())
