"""Where each CPU rank of one host runs: its own physical cores, and how many threads.

:func:`plan_placement` (pure: a :class:`~.cpu_topology.CpuTopology` in, a :class:`Placement`
out) gives local rank ``i`` of ``k`` a disjoint, in-order set of physical cores, one thread
on each (SMT siblings left idle unless asked: two threads on one core share its load units,
which decode, reading memory, does not gain from). On a host with several sockets or NUMA
nodes the ranks are spread so that each rank's cores lie in one NUMA node (``k`` a multiple of
the nodes: ``k / nodes`` ranks per node) or each rank holds whole nodes of one socket (nodes a
multiple of ``k``); where neither fits, or where fitting would leave more cores idle than a
plain in-order split, the plain split is used and the note says the ranks cross nodes.
Every rank gets the same number of cores (a tensor-parallel step waits for its slowest rank);
cores left over stay idle.

Memory stays local without a NUMA policy call: Linux's default policy puts a page on the node
of the CPU that first touches it, and every rank allocates and fills its own weights (its
slices) after it is pinned, so they land on its node.

:func:`place_this_rank` applies a plan to the calling process (every thread of it, so a
thread pool started before is moved too) and sets ``torch.set_num_threads``.
:func:`place_rank_if_asked` is what :func:`xtp.init_distributed` calls: it pins only where
``XTP_PIN`` asks for it (``xtp run``/``bench`` set it for the ranks they start; a user's own
``torchrun`` is never pinned unless ``XTP_PIN=1``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..env import num_threads, pin_mode
from .cpu_topology import Core, CpuTopology, format_cpulist, read_topology


@dataclass(frozen=True)
class RankPlacement:
    """Local rank ``local_rank``'s logical CPUs (``cpus``: one per physical core, or every
    sibling with SMT), its thread count, and the sockets/NUMA nodes those cores are on."""

    local_rank: int
    cpus: tuple[int, ...]
    threads: int
    sockets: tuple[int, ...]
    nodes: tuple[int, ...]

    def describe(self) -> str:
        return (f"rank {self.local_rank}: CPUs {format_cpulist(self.cpus)} ({self.threads} "
                f"thread{'s' if self.threads != 1 else ''}, socket "
                f"{','.join(map(str, self.sockets))}, NUMA node {','.join(map(str, self.nodes))})")


@dataclass(frozen=True)
class Placement:
    """A placement of ``len(ranks)`` local ranks; ``pinned`` is false when they cannot each have
    a core of their own (then ``ranks`` is empty and ``threads`` is each rank's share)."""

    topology: CpuTopology
    ranks: tuple[RankPlacement, ...]
    pinned: bool
    threads: int
    note: str

    def describe(self) -> str:
        """The note, then one line per rank."""
        return "\n".join([self.note] + [r.describe() for r in self.ranks])

    def as_dict(self) -> dict:
        return {"pinned": self.pinned, "threads": self.threads, "note": self.note,
                "ranks": [{"local_rank": r.local_rank, "cpus": format_cpulist(r.cpus),
                           "threads": r.threads, "sockets": list(r.sockets),
                           "nodes": list(r.nodes)} for r in self.ranks]}


def _chunks(cores: Sequence[Core], parts: int, size: int) -> list[tuple[Core, ...]]:
    return [tuple(cores[i * size:(i + 1) * size]) for i in range(parts)]


def _aligned(topo: CpuTopology, k: int) -> tuple[list[tuple[Core, ...]], str] | None:
    domains = [cores for _, _, cores in topo.domains()]
    d = len(domains)
    if k % d == 0:
        m = k // d
        size = min(len(cs) for cs in domains) // m
        if size < 1:
            return None
        how = "one rank per NUMA node" if m == 1 else f"{m} ranks per NUMA node"
        return [c for cs in domains for c in _chunks(cs, m, size)], how
    if d % k == 0:
        g = d // k
        groups = [sum(domains[i * g:(i + 1) * g], ()) for i in range(k)]
        if any(len({c.socket for c in grp}) > 1 for grp in groups):
            return None
        size = min(len(grp) for grp in groups)
        return [grp[:size] for grp in groups], f"each rank on {g} NUMA nodes of one socket"
    return None


def plan_placement(topo: CpuTopology, local_ranks: int, smt: bool = False) -> Placement:
    """Cores for each of ``local_ranks`` ranks on this host (module doc); ``smt``: pin each
    rank to every sibling of its cores and run a thread on each.

    ``XTP_NUM_THREADS``, when set, overrides the thread count (the cores stay the same).

    Raises:
        ValueError: ``local_ranks`` < 1; ``XTP_NUM_THREADS`` not a positive integer
            (:class:`~xtp.accelerators.errors.EnvSettingError`).
    """
    if local_ranks < 1:
        raise ValueError(f"local_ranks must be >= 1, got {local_ranks}")
    forced = num_threads()
    cores, k = topo.cores, local_ranks
    if k > len(cores):
        threads = forced or max(1, topo.logical_cpus // k)
        return Placement(topo, (), False, threads,
                         f"not pinned: {k} ranks > {len(cores)} physical cores; {threads} "
                         f"thread{'s' if threads != 1 else ''} each")
    flat = len(cores) // k
    fit = _aligned(topo, k)
    if fit is not None and len(fit[0][0]) >= flat:
        chunks, how = fit
    else:
        chunks = _chunks(cores, k, flat)
        crossing = sum(len({(c.socket, c.node) for c in ch}) > 1 for ch in chunks)
        how = "in order" + (f" ({crossing} rank(s) cross NUMA nodes: {k} ranks do not divide "
                            f"into the {len(topo.domains())} nodes)" if crossing else "")
    ranks = []
    for i, chunk in enumerate(chunks):
        cpus = tuple(c for core in chunk for c in (core.cpus if smt else core.cpus[:1]))
        ranks.append(RankPlacement(i, cpus, forced or len(cpus),
                                   tuple(sorted({c.socket for c in chunk})),
                                   tuple(sorted({c.node for c in chunk}))))
    used = sum(len(ch) for ch in chunks)
    idle = f"; {len(cores) - used} core(s) left idle" if used < len(cores) else ""
    per = len(chunks[0])
    note = (f"{k} rank{'s' if k != 1 else ''} x {per} physical core{'s' if per != 1 else ''}"
            f"{' (all SMT siblings)' if smt else ', one thread per core'}, {how}{idle}")
    return Placement(topo, tuple(ranks), True, ranks[0].threads, note)


def pin_process(cpus: Sequence[int]) -> None:
    """Restrict every thread of this process to ``cpus`` (``/proc/self/task``; the calling
    thread alone where that is absent). Threads started later inherit it."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile
            continue


def place_this_rank(local_rank: int, local_ranks: int, topology: CpuTopology | None = None,
                    smt: bool | None = None) -> RankPlacement | None:
    """Pin this process to its cores of :func:`plan_placement` and set its torch threads;
    returns its placement (``None`` when the ranks cannot be pinned: then only the threads
    are set). Call before the rank allocates its weights (first touch keeps them local)."""
    import torch

    topo = read_topology() if topology is None else topology
    smt = pin_mode() == "smt" if smt is None else smt
    plan = plan_placement(topo, local_ranks, smt)
    if not plan.pinned:
        torch.set_num_threads(plan.threads)
        return None
    mine = plan.ranks[local_rank % local_ranks]
    pin_process(mine.cpus)
    torch.set_num_threads(mine.threads)
    return mine


def computes_on_cpu(accelerator) -> bool:
    """Whether ``accelerator``'s ranks compute on the host CPU (where placement applies)."""
    return accelerator.device().type == "cpu"


def place_rank_if_asked(accelerator, local_rank: int, local_ranks: int) -> RankPlacement | None:
    """:func:`place_this_rank` when ``XTP_PIN`` asks for pinning (``1``/``smt``) and
    ``accelerator`` computes on the CPU; else nothing (``None``).

    Raises:
        EnvSettingError: ``XTP_PIN`` or ``XTP_NUM_THREADS`` has a value that does not work.
    """
    if pin_mode() not in ("on", "smt") or not computes_on_cpu(accelerator):
        return None
    return place_this_rank(local_rank, local_ranks)


def choose_tp(topo: CpuTopology) -> tuple[int, str]:
    """``--tp auto``'s choice from the topology alone, and why, in one line.

    One memory domain (one socket, one NUMA node): tp 1, since a decode step reads every weight
    once and a single process with all the cores already reads at that domain's bandwidth;
    more ranks share the same bandwidth and add two all-reduces per transformer block. Several
    NUMA nodes: one rank per node, each reading its weights from its own node's memory, so the
    nodes' bandwidths add up (the caller checks that the model takes that tp size)."""
    domains = len(topo.domains())
    cores = len(topo.cores)
    if domains == 1:
        return 1, (f"tp auto: 1 ({topo.describe()}: one memory domain, so one process on all "
                   f"{cores} cores already reads at its bandwidth; tp > 1 would share that "
                   "bandwidth and add two all-reduces per transformer block)")
    tp = min(domains, cores)
    return tp, (f"tp auto: {tp} ({topo.describe()}: one rank per NUMA node, each reading its "
                "weights from its own node's memory, so the nodes' bandwidths add up)")


def tp_hint(topo: CpuTopology, tp: int) -> str | None:
    """A one-line hint when ``tp`` is likely slower than another size on this host, else
    ``None``: tp > 1 on one memory domain; a tp that puts ranks across NUMA nodes."""
    domains = len(topo.domains())
    if tp > 1 and domains == 1:
        return (f"hint: this host is one memory domain ({topo.describe()}); tp 1 on all "
                f"{len(topo.cores)} cores is likely faster for a model that fits in memory (one "
                "process already reads at the bandwidth; tp adds all-reduces): --tp 1 or "
                "--tp auto")
    if domains > 1 and tp % domains and domains % tp:
        return (f"hint: {tp} ranks do not divide into this host's {domains} NUMA nodes, so some "
                f"rank reads remote memory; --tp {domains} (or --tp auto) puts one rank on "
                "each node")
    return None
