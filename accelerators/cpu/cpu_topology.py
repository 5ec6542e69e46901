"""The host's CPU layout as this process may use it: sockets, NUMA nodes, physical cores.

Read from Linux sysfs (``/sys/devices/system/cpu/cpu*/topology`` and
``/sys/devices/system/node/node*/cpulist``) and restricted to the process's affinity mask
(``taskset``, cgroup cpusets, ``numactl``): a core none of whose logical CPUs this process may
run on is left out, and of a core's SMT siblings only the allowed ones are kept. Where sysfs
is missing or unreadable (some containers, non-Linux), every allowed logical CPU counts as one
core of socket 0, NUMA node 0, and :attr:`CpuTopology.source` says so.

``root`` lets tests hand in a fake sysfs tree (a folder holding ``sys/devices/system/...``).
Nothing here runs at import.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CPU_DIR = "sys/devices/system/cpu"
NODE_DIR = "sys/devices/system/node"


@dataclass(frozen=True)
class Core:
    """One physical core: its allowed logical CPUs (``cpus[0]``, the lowest, is the one a rank
    runs its thread on; the rest are its SMT siblings), its socket and NUMA node."""

    cpus: tuple[int, ...]
    socket: int
    node: int


@dataclass(frozen=True)
class CpuTopology:
    """The physical cores this process may use, ordered by (socket, NUMA node, first CPU);
    ``source`` is ``"sysfs"`` or why the fallback was used."""

    cores: tuple[Core, ...]
    source: str = "sysfs"

    @property
    def sockets(self) -> tuple[int, ...]:
        return tuple(sorted({c.socket for c in self.cores}))

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(sorted({c.node for c in self.cores}))

    @property
    def logical_cpus(self) -> int:
        return sum(len(c.cpus) for c in self.cores)

    def domains(self) -> list[tuple[int, int, tuple[Core, ...]]]:
        """``(socket, node, cores)`` per NUMA node of each socket, in order: the units a rank's
        cores should not straddle."""
        out: dict[tuple[int, int], list[Core]] = {}
        for c in self.cores:
            out.setdefault((c.socket, c.node), []).append(c)
        return [(s, n, tuple(cs)) for (s, n), cs in out.items()]

    def describe(self) -> str:
        """One line, e.g. ``2 sockets, 4 NUMA nodes, 32 physical cores (64 logical CPUs)``."""
        def n(k: int, what: str) -> str:
            return f"{k} {what}" + ("" if k == 1 else "s")

        text = (f"{n(len(self.sockets), 'socket')}, {n(len(self.nodes), 'NUMA node')}, "
                f"{n(len(self.cores), 'physical core')} ({n(self.logical_cpus, 'logical CPU')})")
        return text if self.source == "sysfs" else f"{text}; {self.source}"


def parse_cpulist(text: str) -> list[int]:
    """``"0-3,8,10-11"`` -> ``[0, 1, 2, 3, 8, 10, 11]`` (the kernel's list format; empty -> [])."""
    out: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def format_cpulist(cpus: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``."""
    cpus = sorted(set(cpus))
    parts, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            parts.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(parts)


def allowed_cpus() -> set[int]:
    """Logical CPUs this process may run on (its affinity mask), or ``range(os.cpu_count())``
    where the platform has no affinity."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _fallback(allowed: set[int], why: str) -> CpuTopology:
    return CpuTopology(tuple(Core((c,), 0, 0) for c in sorted(allowed)),
                       f"{why}: each of the {len(allowed)} allowed logical CPUs counted as one "
                       "core of one socket")


def read_topology(root: str | os.PathLike = "/", allowed: Iterable[int] | None = None
                  ) -> CpuTopology:
    """The cores of ``allowed`` (default: this process's affinity mask) as sysfs under ``root``
    describes them; never raises for a missing or odd sysfs (the fallback instead)."""
    allowed = allowed_cpus() if allowed is None else set(allowed)
    cpu_dir = Path(root) / CPU_DIR
    node_of: dict[int, int] = {}
    node_dir = Path(root) / NODE_DIR
    if node_dir.is_dir():
        for d in node_dir.glob("node[0-9]*"):
            text = _read(d / "cpulist")
            try:
                for c in parse_cpulist(text or ""):
                    node_of[c] = int(d.name[4:])
            except ValueError:
                continue
    cores: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for cpu in sorted(allowed):
        topo = cpu_dir / f"cpu{cpu}" / "topology"
        package = _read(topo / "physical_package_id")
        siblings = _read(topo / "thread_siblings_list")
        if package is None or siblings is None:
            return _fallback(allowed, f"no sysfs topology for CPU {cpu} under {cpu_dir}")
        try:
            key = (max(0, int(package)), tuple(parse_cpulist(siblings)))
        except ValueError:
            return _fallback(allowed, f"unreadable sysfs topology for CPU {cpu}")
        cores.setdefault(key, []).append(cpu)
    if not cores:
        return _fallback(allowed or {0}, "no allowed CPUs found")
    found = [Core(tuple(cpus), socket, node_of.get(cpus[0], socket))
             for (socket, _), cpus in cores.items()]
    found.sort(key=lambda c: (c.socket, c.node, c.cpus[0]))
    return CpuTopology(tuple(found))
