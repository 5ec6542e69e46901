"""How many intra-op threads each CPU rank should run (``torch.set_num_threads``).

Tensor parallelism on one CPU host splits the cores between the ranks on it: with ``n`` cores
this process may run on and ``k`` ranks on the host, each rank gets ``n // k`` threads (at
least one). More threads than cores make the ranks steal each other's cores, which on a
memory-bound decode step costs more than it gains. ``XTP_NUM_THREADS`` overrides the choice.

Nothing here runs at import: :func:`threads_per_rank` only computes, :func:`apply_threads`
also calls ``torch.set_num_threads``. Where the ranks are pinned (``xtp run``/``bench``, or
``XTP_PIN=1``), :mod:`.placement` decides instead: one thread per physical core the rank is
pinned to; this split of the logical CPUs is what unpinned ranks get.
"""

from __future__ import annotations

import os

from ..env import num_threads


def available_cores() -> int:
    """Logical CPUs this process may run on (its affinity mask, which honours ``taskset``,
    cgroup cpusets and ``numactl``), or ``os.cpu_count()`` where affinity is unknown."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_world_size(tp: int) -> int:
    """Ranks sharing this host: ``LOCAL_WORLD_SIZE`` (set by ``torchrun``), else ``tp``."""
    raw = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return max(1, tp)


def threads_per_rank(tp: int, cores: int | None = None, local_ranks: int | None = None) -> int:
    """Threads for one rank of a tensor-parallel group of size ``tp``.

    Args:
        tp: tensor-parallel size (ranks per group).
        cores: CPUs to share between this host's ranks (default :func:`available_cores`).
            When each rank is already pinned to its own cores, pass that count and
            ``local_ranks=1``.
        local_ranks: ranks on this host that share ``cores`` (default
            :func:`local_world_size`, which counts every TP group on the host).

    Returns:
        ``XTP_NUM_THREADS`` when set, else ``max(1, cores // local_ranks)``.

    Raises:
        ValueError: ``tp`` < 1, or ``XTP_NUM_THREADS`` is not a positive integer
            (:class:`~xtp.accelerators.errors.EnvSettingError`).
    """
    if tp < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tp}")
    forced = num_threads()
    if forced is not None:
        return forced
    cores = available_cores() if cores is None else cores
    local_ranks = local_world_size(tp) if local_ranks is None else local_ranks
    return max(1, cores // max(1, local_ranks))


def apply_threads(tp: int, cores: int | None = None, local_ranks: int | None = None) -> int:
    """``torch.set_num_threads(threads_per_rank(...))``; returns the number set."""
    import torch

    n = threads_per_rank(tp, cores, local_ranks)
    torch.set_num_threads(n)
    return n
