"""Shared-memory collectives for the ranks of one process group that share a CPU host.

:func:`create_cpu_communicator` is what :meth:`CpuAccelerator.communicator` returns: a
:class:`ShmCommunicator` when the group has more than one rank, all on one host (proved by
hostname + boot id, exchanged over the group at creation), the CPU orders stores (x86-64),
``/dev/shm`` has room and nothing switched it off (``XTP_CPU_SHM=0``, ``XTP_DIST_BACKEND``,
``enabled=False``); otherwise the plain :class:`TorchCommunicator` (gloo). Creation is
collective over the group: every rank must create its communicators in the same order.

Contract of :class:`ShmCommunicator`:

* ``all_reduce`` (sum, in place) for float32, bfloat16 and float16 CPU tensors of any size and
  layout; bfloat16/float16 are accumulated in float32 and rounded once. Every rank computes
  the same operations on the same data in the same order, so results are bitwise equal on
  all ranks. ``all_gather`` for CPU tensors of the common dtypes (it only copies bytes; along
  a later dimension each rank's rows go straight into their columns: no transposed copies).
  Anything else (other dtypes, devices, ``broadcast``, ``barrier``) goes to the gloo path.
* Group-local ranks; each group has its own segment (random name), so groups never interfere.
* Never hangs: a rank that does not arrive within ``timeout`` seconds (``XTP_TIMEOUT``,
  default 300), or whose process dies, makes the others raise ``CollectiveTimeoutError``
  naming it. Ranks that call different collectives raise ``CollectiveMismatchError``. After
  either, the communicator refuses further use.
* A rank that failed in a collective of another group (its error is announced through
  :mod:`xtp.accelerators.comm.abort`) marks its control line failed and leaves the message
  in its slot: peers waiting for it raise ``CollectiveError`` with that message at once
  instead of timing out on a rank that will never come.
* Leaves no ``/dev/shm`` entry behind (see :mod:`xtp.accelerators.cpu.shm_segment`).

Protocol per chunk (``seq`` counts chunks; buffer set ``seq % 2``): copy this rank's data into
its slot, write op/size, publish ``seq``; wait until every rank published ``seq``; check they
agree on op and size; reduce (or gather) all slots into the output. One wait per chunk: a rank
can only reuse a buffer set after every peer published the next ``seq``, which each does only
after it finished reading the previous one.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..comm.abort import announce, register
from ..comm.base import Communicator, TorchCommunicator
from ..errors import CollectiveError, CollectiveTimeoutError, XtpError
from .shm_gather import gather_flat, gather_rows, rows_per_chunk
from .shm_segment import LINE_WORDS, SegmentLayout, ShmSegment
from .shm_setup import (
    HostIdentity,
    disabled_reason,
    rendezvous,
    resolve_chunk_bytes,
    resolve_timeout,
)
from .shm_wait import PeerWaiter
from .threads import available_cores, local_world_size

log = logging.getLogger(__name__)

#: dtypes all_reduce serves through shared memory
REDUCE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
#: dtypes all_gather serves (byte copies) -> code checked across ranks
_GATHER_CODES: dict[torch.dtype, int] = {
    dt: i + 1
    for i, dt in enumerate(
        REDUCE_DTYPES + (torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
                         torch.uint8, torch.bool)
    )
}
_OP_ALL_REDUCE, _OP_ALL_GATHER = 1, 2
_FAILED_WORD, _NOTE_BYTES_WORD = 6, 7  # control-line words: failed elsewhere, message length
_SPIN_S, _YIELD_S = 20e-6, 10e-3  # measured: bench/RESULTS.md "All-reduce latency"
_CACHE_LIMIT = 64


class CollectiveMismatchError(XtpError, RuntimeError):
    """Ranks of one group entered different collectives (op, dtype or size differ)."""


class ShmCommunicator(Communicator):
    """All-reduce and all-gather through shared memory; see the module docstring."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        segment: ShmSegment,
        peers: Sequence[HostIdentity],
        timeout: float,
        fallback: TorchCommunicator,
        spin_s: float | None = None,
        yield_s: float | None = None,
    ) -> None:
        self.group = group
        self.fallback = fallback
        self.timeout = timeout
        self.segment = segment
        self._world = fallback.world_size
        self._rank = fallback.rank
        self._peers = list(peers)
        layout = segment.layout
        self.chunk_bytes = layout.slot_bytes
        self._mv = memoryview(segment.mm)
        self._ctrl = self._mv[
            layout.control_offset : layout.control_offset + layout.control_bytes
        ].cast("q")
        self._line = self._rank * LINE_WORDS
        self._ctrl[self._line + 1] = os.getpid()
        self._data = torch.frombuffer(
            segment.mm, dtype=torch.uint8, offset=layout.data_offset, count=layout.data_bytes
        ).view(2, self._world, layout.slot_bytes)
        same_pid_ns = len({p.pid_ns for p in self._peers}) == 1 and self._peers[0].pid_ns
        if spin_s is None:  # spinning only pays when every rank on this host has a core
            spin_s = _SPIN_S if local_world_size(self._world) <= available_cores() else 0.0
        self._waiter = PeerWaiter(
            self._ctrl, self._world, timeout, spin_s, _YIELD_S if yield_s is None else yield_s,
            [p.pid for p in self._peers] if same_pid_ns else None, self._describe,
            self._failure_of,
        )
        self._seq = 0
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._slots: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._acc: torch.Tensor | None = None
        register(self)

    @classmethod
    def create(
        cls,
        group: dist.ProcessGroup | None = None,
        *,
        timeout: float | None = None,
        chunk_bytes: int | None = None,
        spin_s: float | None = None,
        yield_s: float | None = None,
        fallback: TorchCommunicator | None = None,
    ) -> tuple[ShmCommunicator | None, str | None]:
        """Collective over ``group``: ``(communicator, None)`` or ``(None, why not)``.

        Every rank gets the same answer; unlike :func:`create_cpu_communicator` it ignores the
        switches (``XTP_CPU_SHM``...). ``timeout``/``chunk_bytes`` left ``None`` come from the
        environment; ``spin_s``/``yield_s`` (wait policy, see :class:`PeerWaiter`) from the
        measured defaults."""
        fallback = fallback or TorchCommunicator(group)
        if fallback.world_size < 2:
            return None, "a group of one rank needs no collectives"
        layout = SegmentLayout(fallback.world_size, resolve_chunk_bytes(chunk_bytes))
        timeout = resolve_timeout(timeout)
        rv = rendezvous(group, layout)
        if rv.segment is None:
            return None, rv.reason
        return cls(group, rv.segment, rv.peers, timeout, fallback, spin_s, yield_s), None

    # ---- Communicator ----------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self._world

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def segment_name(self) -> str:
        return self.segment.name

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype not in REDUCE_DTYPES or tensor.device.type != "cpu":
            return self.fallback.all_reduce(tensor)
        with self._lock, torch.no_grad():
            self._check_usable()
            if tensor.is_contiguous():
                self._reduce_flat(tensor.view(-1))
            else:
                buf = tensor.contiguous()
                self._reduce_flat(buf.view(-1))
                tensor.copy_(buf)
        return tensor

    def all_gather(
        self, tensor: torch.Tensor, dim: int = -1, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        code = _GATHER_CODES.get(tensor.dtype)
        if code is None or tensor.device.type != "cpu" or tensor.dim() == 0:
            return self.fallback.all_gather(tensor, dim, sizes)
        dim = dim % tensor.dim()
        sizes = [tensor.shape[dim]] * self._world if sizes is None else list(sizes)
        if len(sizes) != self._world or sizes[self._rank] != tensor.shape[dim]:
            raise ValueError(
                f"rank {self._rank}: sizes {sizes} do not match local extent "
                f"{tensor.shape[dim]} over {self._world} ranks"
            )
        total = math.prod(n for i, n in enumerate(tensor.shape) if i != dim) * sum(sizes)

        def exchange(piece: torch.Tensor) -> list[torch.Tensor]:
            mine, slots = self._slot_views(piece.dtype, self.chunk_bytes // piece.element_size())
            mine[: piece.numel()].copy_(piece)
            self._exchange((_OP_ALL_GATHER << 8) | code, total, "all_gather")
            return slots

        rows = rows_per_chunk(tensor.shape, dim, sizes, tensor.element_size(), self.chunk_bytes)
        if rows:  # along a later dimension, whole rows per chunk: no transposed copies
            local = tensor.contiguous()
            outer = math.prod(local.shape[:dim])
            out = local.new_empty((*local.shape[:dim], sum(sizes), *local.shape[dim + 1:]))
            inner = math.prod(local.shape[dim + 1:])
            with self._lock, torch.no_grad():
                self._check_usable()
                gather_rows(exchange, local.reshape(outer, sizes[self._rank] * inner),
                            out.view(outer, -1), [s * inner for s in sizes], rows)
            return out
        local = tensor.movedim(dim, 0).contiguous()
        out = local.new_empty((sum(sizes), *local.shape[1:]))
        with self._lock, torch.no_grad():
            self._check_usable()
            gather_flat(exchange, local, out, sizes, self._rank, self.chunk_bytes)
        return out.movedim(0, dim).contiguous()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self.fallback.broadcast(tensor, src)

    def barrier(self) -> None:
        self.fallback.barrier()

    def close(self) -> None:
        """Unmap the segment; the communicator cannot be used afterwards. Optional: the
        mapping is released at process exit anyway."""
        with self._lock:
            self._broken = self._broken or "this communicator was closed"
            self._slots.clear()
            self._acc = None
            del self._data
            self._ctrl.release()
            self._mv.release()
            self.segment.close()

    def __repr__(self) -> str:
        return (
            f"<ShmCommunicator rank {self._rank}/{self._world} segment={self.segment.name} "
            f"chunk={self.chunk_bytes} timeout={self.timeout:g}s>"
        )

    # ---- protocol --------------------------------------------------------------------
    def _reduce_flat(self, flat: torch.Tensor) -> None:
        n = flat.numel()
        cap = self.chunk_bytes // flat.element_size()
        code = (_OP_ALL_REDUCE << 8) | _GATHER_CODES[flat.dtype]
        for start in range(0, n, cap):
            part = flat[start : start + cap] if n > cap else flat
            m = part.numel()
            mine, slots = self._slot_views(flat.dtype, m)
            mine.copy_(part)
            self._exchange(code, n, "all_reduce")
            self._sum_into(slots, part)

    def _sum_into(self, slots: list[torch.Tensor], out: torch.Tensor) -> None:
        if len(slots) == 2 or out.dtype == torch.float32:
            # one op per pair; reduced-precision pairs are computed in fp32, rounded once
            torch.add(slots[0], slots[1], out=out)
            for s in slots[2:]:
                out.add_(s)
            return
        acc = self._accumulator(out.numel())
        acc.copy_(slots[0])
        for s in slots[1:]:
            acc.add_(s)
        out.copy_(acc)

    def _slot_views(self, dtype: torch.dtype, m: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """This rank's slot and every rank's slot, ``m`` elements of ``dtype``, in the buffer
        set the next ``seq`` uses."""
        key = (dtype, (self._seq + 1) & 1, m)
        views = self._slots.get(key)
        if views is None:
            if len(self._slots) >= _CACHE_LIMIT:
                self._slots.clear()
            block = self._data[key[1]].view(dtype)
            slots = [block[r, :m] for r in range(self._world)]
            views = self._slots[key] = (slots[self._rank], slots)
        return views

    def _exchange(self, code: int, count: int, op: str) -> None:
        """Publish the next ``seq`` with (code, count), wait for all ranks, check agreement."""
        seq = self._seq = self._seq + 1
        c, line, meta = self._ctrl, self._line, 2 + 2 * (seq & 1)
        c[line + meta] = code
        c[line + meta + 1] = count
        c[line] = seq
        try:
            self._waiter.wait(seq, f"{op} (step #{seq})")
        except CollectiveError as exc:
            self._broken = str(exc)
            announce(self._broken, source=self)
            raise
        for r in range(self._world):
            base = r * LINE_WORDS + meta
            if c[base] != code or c[base + 1] != count:
                self._broken = (
                    f"group rank {r} entered {_name(c[base])} of {c[base + 1]} elements while "
                    f"group rank {self._rank} entered {_name(code)} of {count} elements "
                    f"(collective #{seq}); every rank must call the same collectives in order"
                )
                announce(self._broken, source=self)
                raise CollectiveMismatchError(self._broken)

    def peer_failed_elsewhere(self, message: str) -> None:
        """This process failed in another collective: mark this rank's control line failed,
        with ``message`` in its slot of the set its next step would have used (no peer reads
        that slot before this rank publishes that step, which it now never does)."""
        if getattr(self, "_data", None) is None or self._ctrl[self._line + _FAILED_WORD]:
            return  # closed, or told already
        note = message.encode("utf-8", "replace")[: self.chunk_bytes]
        slot = self._data[(self._seq + 1) & 1, self._rank]
        slot[: len(note)].copy_(torch.frombuffer(bytearray(note), dtype=torch.uint8))
        self._ctrl[self._line + _NOTE_BYTES_WORD] = len(note)
        self._ctrl[self._line + _FAILED_WORD] = 1  # after the message: x86 keeps store order
        self._broken = self._broken or f"this rank failed in another collective: {message}"

    def _failure_of(self, r: int) -> str | None:
        """Group rank ``r``'s announced failure message, or ``None`` (see
        :meth:`peer_failed_elsewhere`)."""
        base = r * LINE_WORDS
        if not self._ctrl[base + _FAILED_WORD]:
            return None
        n = self._ctrl[base + _NOTE_BYTES_WORD]
        # the failed rank's next step is one past the last one it published
        slot = self._data[(self._ctrl[base] + 1) & 1, r]
        return bytes(slot[:n].numpy()).decode("utf-8", "replace")

    def _accumulator(self, m: int) -> torch.Tensor:
        if self._acc is None or self._acc.numel() < m:
            self._acc = torch.empty(self.chunk_bytes // 2, dtype=torch.float32)
        return self._acc[:m]

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise CollectiveTimeoutError(
                f"this shared-memory communicator failed earlier and cannot be reused: "
                f"{self._broken}"
            )

    def _describe(self, op: str, missing: list[int], why: str) -> str:
        who = ", ".join(
            f"group rank {r} (global rank {self._peers[r].global_rank}, pid {self._peers[r].pid})"
            for r in missing
        )
        advice = (". Set XTP_TIMEOUT to wait longer, or XTP_CPU_SHM=0 to use gloo instead"
                  if "timed out" in why else "")
        return (
            f"xtp shared-memory {op} on a group of {self._world} ranks (this is group rank "
            f"{self._rank}): {who} did not arrive: {why}{advice}"
        )


def _name(code: int) -> str:
    op = {_OP_ALL_REDUCE: "all_reduce", _OP_ALL_GATHER: "all_gather"}.get(code >> 8, "?")
    dtypes = {v: k for k, v in _GATHER_CODES.items()}
    return f"{op}[{str(dtypes.get(code & 0xFF, '?')).replace('torch.', '')}]"


def create_cpu_communicator(
    group: dist.ProcessGroup | None = None,
    *,
    enabled: bool | None = None,
    timeout: float | None = None,
    chunk_bytes: int | None = None,
) -> Communicator:
    """The fastest correct Communicator for ``group`` on CPUs; collective when ``group`` has
    more than one rank and the shared-memory path is not switched off.

    Args:
        enabled: ``False`` never uses shared memory; ``True`` ignores ``XTP_CPU_SHM`` and
            ``XTP_DIST_BACKEND``; ``None`` (default) honours them.
        timeout: seconds to wait for peers (default ``XTP_TIMEOUT`` or 300).
        chunk_bytes: bytes per rank per buffer (default ``XTP_CPU_SHM_CHUNK_BYTES`` or 1 MiB).
    """
    fallback = TorchCommunicator(group)
    if fallback.world_size < 2:
        return fallback
    reason = disabled_reason(enabled)
    if reason is None:
        comm, reason = ShmCommunicator.create(
            group, timeout=timeout, chunk_bytes=chunk_bytes, fallback=fallback
        )
        if comm is not None:
            return comm
    log.info("xtp: shared-memory collectives not used for this group: %s", reason)
    return fallback
