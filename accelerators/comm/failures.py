"""Who the ranks of a process group are, and what to say when a collective with them fails.

:func:`record_peers` (called by ``xtp.init_distributed``; collective) all-gathers each rank's
host identity and pid once, with any small values the ranks must agree on. Afterwards, when a
``torch.distributed`` call raises (gloo: "Connection reset by peer", "Timed out waiting
...ms"; NCCL: a ``DistBackendError``), :func:`collective_failure` turns it into an error that
names the rank(s) at fault:

* :class:`CollectiveError` naming every rank of the group whose process is provably gone
  (same host and pid namespace: ``/proc/<pid>`` missing or a zombie);
* else :class:`CollectiveTimeoutError` naming the ranks that did not reach the collective: a
  *roll call* in the process group's store, where each failing rank posts the collective's
  sequence number and waits a short grace period for the others' posts;
* else (no store, or every rank reached it) a :class:`CollectiveError` with torch's reason.

Nothing here runs on the success path except one sequence-number increment per collective.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch.distributed as dist

from ..errors import CollectiveError, CollectiveTimeoutError, XtpError
from .abort import announce
from .host import process_gone, this_process

_GONE_WAIT_S = 1.0  # a killed process closes its sockets a moment before it is a zombie
_POLL_S = 0.05


@dataclass(frozen=True)
class Peer:
    """One rank's process: global rank, hostname, machine identity (boot id + pid namespace,
    :attr:`~xtp.accelerators.comm.host.ProcessIdentity.pid_space`: equal values mean its pid
    can be checked from here) and pid."""

    rank: int
    host: str
    machine: str
    pid: int

    def where(self) -> str:
        return f"pid {self.pid} on {self.host}"


_peers: dict[int, Peer] = {}
_world: list = [None]  # the WORLD process group _peers belong to (reset when it changes)
_timeout_s: list[float | None] = [None]
_setup_seq: dict[str, int] = {}


def this_peer() -> Peer:
    """This process as a :class:`Peer` (global rank 0 outside a process group)."""
    me = this_process()
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Peer(rank, me.hostname, me.pid_space, me.pid)


def _fresh() -> None:
    world = dist.group.WORLD if dist.is_initialized() else None
    if _world[0] is not world:
        _peers.clear()
        _setup_seq.clear()
        _world[0] = world


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """Global ranks of ``group`` (``None``: the default group), in group-rank order."""
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def record_peers(group: dist.ProcessGroup | None = None, agree: dict | None = None,
                 timeout: float | None = None) -> list[dict]:
    """All-gather this rank's :class:`Peer` and ``agree`` over ``group`` (collective); remember
    every member for later error messages. Returns each group rank's ``agree``.

    ``timeout``: the collective timeout in seconds, quoted in error messages."""
    _fresh()
    if timeout is not None:
        _timeout_s[0] = float(timeout)
    everyone: list = [None] * dist.get_world_size(group)
    with guarded("the setup exchange of rank identities", group):
        dist.all_gather_object(everyone, (this_peer(), agree), group=group)
    for peer, _ in everyone:
        _peers[peer.rank] = peer
    return [a for _, a in everyone]


def known_peers() -> dict[int, Peer]:
    """Every rank :func:`record_peers` has recorded in this world: global rank -> :class:`Peer`
    (a copy; ``xtp.init_distributed`` reads the hosts from it to place the TP groups)."""
    _fresh()
    return dict(_peers)


def gone_ranks(ranks: Sequence[int], wait_s: float = 0.0) -> list[int]:
    """Those of global ``ranks`` whose process provably exited (same machine only), waiting up
    to ``wait_s`` seconds for one to show up as gone."""
    me = this_peer()
    local = [p for r in ranks if (p := _peers.get(r)) is not None and p.machine == me.machine
             and p.pid != me.pid]
    if not local:  # none can be checked from here (other hosts): no point waiting
        return []
    deadline = time.monotonic() + wait_s
    while True:
        gone = [p.rank for p in local if process_gone(p.pid)]
        if gone or time.monotonic() >= deadline:
            return gone
        time.sleep(_POLL_S)


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: the roll call is skipped
        return None


def roll_call(key: str, ranks: Sequence[int], grace: float) -> list[int] | None:
    """Post ``key`` for this rank in the default store and wait up to ``grace`` seconds for the
    other ``ranks`` to post it; return the ranks that did not (``None``: no usable store)."""
    store = _store()
    if store is None:
        return None
    me = dist.get_rank()
    try:
        store.set(f"xtp/rollcall/{key}/{me}", str(os.getpid()))
        deadline = time.monotonic() + grace
        while True:
            absent = [r for r in ranks if r != me
                      and not store.check([f"xtp/rollcall/{key}/{r}"])]
            if not absent or time.monotonic() >= deadline:
                return absent
            time.sleep(_POLL_S)
    except Exception:  # noqa: BLE001 - the store's host may be the rank that died
        return None


def _who(ranks: Sequence[int], group_rank: dict[int, int], world: bool) -> str:
    parts = []
    for r in ranks:
        p = _peers.get(r)
        about = ([] if world else [f"group rank {group_rank[r]}"]) + ([p.where()] if p else [])
        name = f"rank {r}" if world else f"global rank {r}"
        parts.append(f"{name} ({', '.join(about)})" if about else name)
    return ", ".join(parts)


def _remote_hosts(ranks: Sequence[int]) -> str:
    """`` (host h runs global ranks 2, 3)`` for each other machine among ``ranks``' hosts: a node
    that went down takes all of them (``""`` when none is on another machine)."""
    me = this_peer().machine
    hosts = dict.fromkeys(p.host for r in ranks
                          if (p := _peers.get(r)) is not None and p.machine != me)
    parts = [f"host {h} runs global ranks "
             + ", ".join(str(r) for r in sorted(_peers) if _peers[r].host == h) for h in hosts]
    return f" ({'; '.join(parts)})" if parts else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    line = line[line.find("] ") + 2:] if line.startswith("[") and "] " in line else line
    return line.split(". This is typically")[0]  # gloo's advice: check the remote worker


def collective_failure(op: str, group: dist.ProcessGroup | None, exc: BaseException,
                       seq: int | None = None) -> XtpError:
    """The xtp error for ``exc``, raised by collective ``op`` (``seq``: its sequence number on
    this group, identical on every rank) on ``group``. See the module doc. The error is
    announced (:mod:`~xtp.accelerators.comm.abort`) so that this rank's peers in other groups
    stop waiting for it."""
    if isinstance(exc, XtpError):
        return exc
    error = _diagnose(op, group, exc, seq)
    announce(str(error))
    return error


def _diagnose(op: str, group: dist.ProcessGroup | None, exc: BaseException,
              seq: int | None) -> XtpError:
    _fresh()
    try:
        ranks = group_ranks(group)
        me = dist.get_rank()
    except Exception:  # noqa: BLE001 - torch.distributed itself is gone
        return CollectiveError(f"{op} failed: {_first_line(exc)}")
    world = len(ranks) == dist.get_world_size()
    group_rank = {r: i for i, r in enumerate(ranks)}
    where = "the process group" if world else f"the group of global ranks {ranks}"
    others = [r for r in ranks if r != me]
    reason = _first_line(exc)
    timeout = _timeout_s[0]
    timed_out = "timed out" in reason.lower() or "timeout" in reason.lower()
    gone = gone_ranks(others, 0.0 if timed_out else _GONE_WAIT_S)
    if gone:
        return CollectiveError(
            f"{op} on {where} failed on rank {me}: {_who(gone, group_rank, world)} exited "
            f"(killed or crashed), so it can never complete; that rank's own output says why. "
            f"(torch: {reason})")
    grace = 5.0 if timeout is None else min(5.0, max(1.0, timeout / 2))
    tag = hashlib.sha1(",".join(map(str, ranks)).encode()).hexdigest()[:12]
    absent = roll_call(f"{tag}/{op}#{seq}", others, grace) if seq is not None else None
    limit = f"within the {timeout:g} s timeout (XTP_TIMEOUT)" if timeout else "in time"
    if absent:
        return CollectiveTimeoutError(
            f"{op} on {where} failed on rank {me}: {_who(absent, group_rank, world)} did not "
            f"reach it {limit}{_remote_hosts(absent)}; it is stuck, died on another host, or "
            f"failed outside a "
            f"collective (its output says why), or the ranks call different collectives. "
            f"(torch: {reason})")
    if timed_out:
        return CollectiveTimeoutError(
            f"{op} on {where} did not complete {limit} on rank {me}; no rank of the group is "
            f"known to have exited. Set XTP_TIMEOUT to wait longer. (torch: {reason})")
    return CollectiveError(f"{op} on {where} failed on rank {me}: {reason}; no rank of the "
                           "group is known to have exited (see the other ranks' output)")


@contextmanager
def guarded(op: str, group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Run a setup-time collective ``op`` on ``group``; a ``RuntimeError`` from torch becomes
    :func:`collective_failure`'s error. Each use counts as one collective of the group."""
    _fresh()
    try:
        key = ",".join(map(str, group_ranks(group))) + "/" + op
    except Exception:  # noqa: BLE001
        key = op
    seq = _setup_seq[key] = _setup_seq.get(key, 0) + 1
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, XtpError):
            raise
        raise collective_failure(op, group, exc, seq) from exc
