"""Bounded waiting for peers' sequence numbers in a shared-memory segment.

A rank publishes ``seq`` in its control line after writing its data; :meth:`PeerWaiter.wait`
returns once every rank of the group has published at least ``seq``. It never waits forever:

* it spins for ``spin_s`` (the common case: peers arrive within microseconds; no spinning
  at all when the group has more ranks than this process has cores, where spinning would
  steal the core a peer needs), then calls ``sched_yield`` until ``yield_s`` has passed, then
  sleeps in growing steps up to 1 ms;
* from 0.5 s on it checks every 0.5 s whether a missing peer's process still exists (when
  the peers share this process's pid namespace) and raises as soon as one is gone;
* at ``timeout`` seconds it raises :class:`CollectiveTimeoutError` naming every group rank
  that has not arrived;
* while sleeping it raises :class:`CollectiveError` as soon as the rank it waits for marked
  itself failed in another collective, quoting that rank's error.

Memory ordering: the data copy happens before the sequence store in program order, and
readers read the sequence number before the data. That is enough on total-store-order CPUs
(x86-64) without explicit fences; :func:`memory_order_ok` says whether this CPU is one.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence

from ..comm.host import process_gone
from ..errors import CollectiveError, CollectiveTimeoutError
from .shm_segment import LINE_WORDS

_TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
_LIVENESS_AFTER_S = 0.5
_LIVENESS_EVERY_S = 0.5
_MAX_SLEEP_S = 1e-3


def memory_order_ok() -> str | None:
    """``None`` when plain loads and stores are ordered enough (x86), else the reason not."""
    machine = platform.machine().lower()
    if machine in _TSO_MACHINES:
        return None
    return (
        f"CPU architecture {machine!r} may reorder stores; the pure-Python shared-memory "
        "protocol is only enabled on x86-64"
    )


class PeerWaiter:
    """Waits for the ranks of one group to publish a sequence number.

    Args:
        control: the segment's control lines as an int64 memoryview (``format == "q"``).
        world: ranks in the group.
        timeout: seconds before :class:`CollectiveTimeoutError`.
        spin_s: seconds of busy spinning before yielding the CPU.
        yield_s: seconds (from the start of the wait) of ``sched_yield`` before sleeping.
        pids: each group rank's pid, or ``None`` when they live in another pid namespace.
        describe: ``describe(op, missing, why)`` -> the error message for missing group ranks.
        failure_of: ``failure_of(r)`` -> the message group rank ``r`` left when it failed in
            another collective (it will never arrive), else ``None``.
    """

    def __init__(
        self,
        control: memoryview,
        world: int,
        timeout: float,
        spin_s: float,
        yield_s: float,
        pids: Sequence[int] | None,
        describe: Callable[[str, list[int], str], str],
        failure_of: Callable[[int], str | None] = lambda r: None,
    ) -> None:
        self._control = control
        self._world = world
        self._timeout = timeout
        self._spin_s = spin_s
        self._yield_s = max(yield_s, spin_s)
        self._pids = list(pids) if pids is not None else None
        self._describe = describe
        self._failure_of = failure_of

    def missing(self, seq: int) -> list[int]:
        """Group ranks that have not yet published ``seq``."""
        c = self._control
        return [r for r in range(self._world) if c[r * LINE_WORDS] < seq]

    def wait(self, seq: int, op: str) -> None:
        """Return when every rank has published ``seq``; raise CollectiveTimeoutError if not."""
        c = self._control
        for r in range(self._world):
            if c[r * LINE_WORDS] < seq:
                self._wait_slow(seq, op, r)

    def _wait_slow(self, seq: int, op: str, r: int) -> None:
        word = r * LINE_WORDS
        c = self._control
        perf = time.perf_counter
        start = perf()
        if self._spin_s > 0:
            end = start + self._spin_s
            n = 0
            while c[word] < seq:
                n += 1
                if not n & 63 and perf() > end:
                    break
            else:
                return
        yield_end = start + self._yield_s
        while c[word] < seq:
            if perf() > yield_end:
                break
            os.sched_yield()
        else:
            return
        deadline = start + self._timeout
        next_check = start + _LIVENESS_AFTER_S
        nap = 2e-5
        while c[word] < seq:
            now = perf()
            failure = self._failure_of(r)
            if failure is not None:
                raise CollectiveError(self._describe(
                    op, [r], f"it failed in another collective and will never arrive; its "
                    f"error: {failure}"))
            if now > next_check:
                next_check = now + _LIVENESS_EVERY_S
                self._raise_if_peer_gone(seq, op)
            if now > deadline:
                missing = self.missing(seq)
                if missing:
                    raise CollectiveTimeoutError(
                        self._describe(op, missing, f"timed out after {self._timeout:g} s")
                    )
                return
            time.sleep(nap)
            nap = min(nap * 2, _MAX_SLEEP_S)

    def _raise_if_peer_gone(self, seq: int, op: str) -> None:
        if self._pids is None:
            return
        gone = [r for r in self.missing(seq) if process_gone(self._pids[r])]
        if gone:
            raise CollectiveTimeoutError(
                self._describe(op, gone, "its process has exited, so it can never arrive")
            )
