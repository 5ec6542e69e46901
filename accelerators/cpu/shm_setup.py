"""Configuration and rendezvous for the shared-memory communicator
(:mod:`xtp.accelerators.cpu.shm`).

Environment (parsed by :mod:`xtp.accelerators.env` when a communicator is created, never at
import):

* ``XTP_CPU_SHM=0`` (or ``false``/``off``/``no``) switches the shared-memory path off;
  so does ``XTP_DIST_BACKEND`` set to anything (an explicit backend choice means "use it").
  These must be the same on every rank (``torchrun`` passes one environment to all ranks).
* ``XTP_TIMEOUT``: seconds a rank waits for its peers before ``CollectiveTimeoutError``
  (default 300).
* ``XTP_CPU_SHM_CHUNK_BYTES``: bytes per rank per buffer; larger tensors go through in chunks.

:func:`rendezvous` decides, uniformly on every rank, whether the group can use shared memory
and returns each rank's mapped segment. It costs two ``all_gather_object`` calls on the group:

1. every rank sends its host identity (hostname, boot id, pid namespace, pid, whether its CPU
   and ``/dev/shm`` qualify); rank 0 has already created the segment and adds its name and a
   random token, so two groups on one host never share a segment. Ranks on different hosts,
   or different boots of a host, make everyone fall back.
2. the other ranks attach and everyone reports success; then rank 0 unlinks the name (so the
   kernel frees the memory with the last process). Any failure anywhere -> everyone falls back.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass

import torch.distributed as dist

from ..comm.host import ProcessIdentity, this_process
from ..env import (
    ENV_CPU_SHM,
    ENV_DIST_BACKEND,
    cpu_shm_switched_off,
    dist_backend,
    shm_chunk_bytes,
    timeout_seconds,
)
from .shm_segment import SegmentLayout, ShmSegment, shm_supported
from .shm_wait import memory_order_ok


def disabled_reason(enabled: bool | None = None) -> str | None:
    """Why the shared-memory path is switched off by option or environment, or ``None``.

    ``enabled=True`` ignores the environment, ``False`` always disables, ``None`` reads it."""
    if enabled is not None:
        return None if enabled else "disabled by option (enabled=False)"
    backend = dist_backend()
    if backend:
        return f"{ENV_DIST_BACKEND}={backend} selects the collective backend explicitly"
    switch = cpu_shm_switched_off()
    if switch is not None:
        return f"disabled by {ENV_CPU_SHM}={switch}"
    return None


def resolve_timeout(timeout: float | None = None) -> float:
    """``timeout`` if given, else ``XTP_TIMEOUT``, else 300 seconds.

    Raises:
        ValueError: ``timeout`` is not positive, or ``XTP_TIMEOUT`` is not a positive number
            (:class:`~xtp.accelerators.errors.EnvSettingError`)."""
    if timeout is None:
        return timeout_seconds()
    if not timeout > 0:
        raise ValueError(f"collective timeout must be > 0 seconds, got {timeout}")
    return float(timeout)


def resolve_chunk_bytes(chunk_bytes: int | None = None) -> int:
    """``chunk_bytes`` if given, else ``XTP_CPU_SHM_CHUNK_BYTES``, else 1 MiB; rounded up to
    a multiple of 64 bytes."""
    if chunk_bytes is None:
        chunk_bytes = shm_chunk_bytes()
    if chunk_bytes < 64:
        raise ValueError(f"shared-memory chunk must be at least 64 bytes, got {chunk_bytes}")
    return (chunk_bytes + 63) // 64 * 64


@dataclass(frozen=True)
class HostIdentity(ProcessIdentity):
    """What a rank tells its peers at creation: its process (hostname, boot id, pid namespace,
    pid), global rank, and why it cannot use shared memory, if it cannot."""

    global_rank: int
    problem: str | None

    @classmethod
    def here(cls) -> HostIdentity:
        me = this_process()
        problem = memory_order_ok() or shm_supported()
        if not me.boot_id and problem is None:
            problem = "cannot read /proc/sys/kernel/random/boot_id to prove ranks share a host"
        return cls(me.hostname, me.boot_id, me.pid_ns, me.pid,
                   dist.get_rank() if dist.is_initialized() else 0, problem)


@dataclass
class Rendezvous:
    """Outcome of :func:`rendezvous`: a segment for this rank, or the reason there is none."""

    segment: ShmSegment | None
    peers: list[HostIdentity]
    reason: str | None = None


def rendezvous(group: dist.ProcessGroup | None, layout: SegmentLayout) -> Rendezvous:
    """Agree with the group on one fresh segment; collective over ``group``. See module doc."""
    rank = dist.get_rank(group)
    me = HostIdentity.here()
    segment: ShmSegment | None = None
    offer: tuple[str, str] | None = None
    try:
        if rank == 0 and me.problem is None:
            token = secrets.token_hex(8)
            try:
                segment = ShmSegment.create(layout, token)
                offer = (segment.name, token)
            except OSError as exc:
                me = _with_problem(me, f"cannot create a {layout.size}-byte segment: {exc}")
        peers: list = [None] * layout.world
        dist.all_gather_object(peers, (me, offer), group=group)
        offer = peers[0][1]
        peers = [p for p, _ in peers]
        reason = _host_mismatch(peers)
        if reason is None and offer is None:
            reason = "group rank 0 could not create a segment"
        if reason is not None:
            return Rendezvous(_drop(segment), peers, reason)
        error = None
        if rank != 0:
            try:
                segment = ShmSegment.attach(offer[0], layout, offer[1])
            except (OSError, ValueError) as exc:
                error = f"group rank {rank} could not attach {offer[0]}: {exc}"
        errors: list = [None] * layout.world
        dist.all_gather_object(errors, error, group=group)
        if segment is not None:
            segment.unlink()
        errors = [e for e in errors if e]
        if errors:
            return Rendezvous(_drop(segment), peers, "; ".join(errors))
        return Rendezvous(segment, peers)
    except BaseException:
        _drop(segment)
        raise


def _host_mismatch(peers: list[HostIdentity]) -> str | None:
    for r, p in enumerate(peers):
        if p.problem:
            return f"group rank {r}: {p.problem}"
    first = peers[0]
    for r, p in enumerate(peers[1:], 1):
        if (p.hostname, p.boot_id) != (first.hostname, first.boot_id):
            return (
                f"group rank {r} runs on {p.hostname!r} (boot {p.boot_id[:8]}), group rank 0 "
                f"on {first.hostname!r} (boot {first.boot_id[:8]}): not one host"
            )
    return None


def _drop(segment: ShmSegment | None) -> None:
    if segment is not None:
        segment.unlink()
        segment.close()


def _with_problem(me: HostIdentity, problem: str) -> HostIdentity:
    return dataclasses.replace(me, problem=problem)
