"""Partition math: which slice of a dimension each rank owns. Pure functions, no torch.

A :class:`Partition` splits ``total`` elements into ``len(sizes)`` contiguous ranges. Head-
granular partitions never cut a head; when heads do not divide, the first ranks get one more
(6 heads over 4 ranks -> 2, 2, 1, 1). With fewer KV heads than ranks, each KV head is
replicated on the ranks whose query heads use it (any tp up to the number of query heads: 4
heads and 2 KV heads over 3 ranks -> query heads 1, 1, 2 with KV heads 0, 0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TPSizeError


def split_even(total: int, parts: int) -> tuple[int, ...]:
    """``total`` units over ``parts`` ranks, sizes differing by at most one, larger first."""
    if parts < 1:
        raise TPSizeError(f"tp_size must be >= 1, got {parts}")
    base, extra = divmod(total, parts)
    return tuple(base + (1 if r < extra else 0) for r in range(parts))


def split_aligned(total: int, parts: int, align: int = 8) -> tuple[int, ...]:
    """Like :func:`split_even` but in units of the largest of ``align, align/2, ..., 1`` that
    divides ``total`` and leaves every rank at least one unit (kernels such as grouped GEMMs
    want row strides that are multiples of 16 bytes)."""
    unit = align
    while unit > 1 and (total % unit or total // unit < parts):
        unit //= 2
    return tuple(n * unit for n in split_even(total // unit, parts))


@dataclass(frozen=True)
class Partition:
    """Contiguous ranges of one dimension: rank ``r`` owns ``[starts[r], starts[r] + sizes[r])``."""

    sizes: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def starts(self) -> tuple[int, ...]:
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return tuple(out)

    def range(self, rank: int) -> tuple[int, int]:
        start = self.starts[rank]
        return start, start + self.sizes[rank]

    def scaled(self, unit: int) -> Partition:
        """The same split with every unit widened to ``unit`` elements (heads -> features)."""
        return Partition(tuple(s * unit for s in self.sizes))

    @property
    def is_even(self) -> bool:
        return len(set(self.sizes)) == 1


@dataclass(frozen=True)
class HeadPartition:
    """How attention heads are spread over ``tp`` ranks.

    ``q``: query heads per rank (a Partition of ``num_heads``). ``kv_ranges[r]``: the KV heads
    rank ``r`` holds (``[start, stop)``; the same head may sit on several ranks when replicated).
    """

    num_heads: int
    num_kv_heads: int
    q: Partition
    kv_ranges: tuple[tuple[int, int], ...]

    @property
    def tp(self) -> int:
        return len(self.q.sizes)

    @property
    def kv_replicated(self) -> bool:
        return self.num_kv_heads < self.tp

    def local_heads(self, rank: int) -> int:
        return self.q.sizes[rank]

    def local_kv_heads(self, rank: int) -> int:
        a, b = self.kv_ranges[rank]
        return b - a


def _head_problem(num_heads: int, num_kv_heads: int, tp: int) -> str | None:
    """Why ``tp`` ranks cannot share these heads, or ``None`` when they can."""
    if tp < 1:
        return f"tp_size must be >= 1, got {tp}"
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        return f"{num_heads} query heads cannot be grouped over {num_kv_heads} KV heads"
    if tp > num_heads:
        return (f"tp_size={tp} is larger than the number of attention heads ({num_heads}); "
                "every rank needs at least one head")
    return None


def valid_head_tp_sizes(num_heads: int, num_kv_heads: int, limit: int = 64) -> list[int]:
    """TP sizes (<= ``limit``) that :func:`partition_heads` accepts for this head layout."""
    return [tp for tp in range(1, limit + 1) if _head_problem(num_heads, num_kv_heads, tp) is None]


def partition_heads(num_heads: int, num_kv_heads: int, tp: int) -> HeadPartition:
    """Spread ``num_heads`` query heads and ``num_kv_heads`` KV heads over ``tp`` ranks.

    * ``num_kv_heads >= tp``: the KV groups (one KV head plus its ``num_heads/num_kv_heads``
      query heads) are split evenly-as-possible; each rank keeps whole groups.
    * ``num_kv_heads < tp``: the ranks are spread evenly-as-possible over the KV groups
      (``split_even(tp, num_kv_heads)``, first groups get one more); each KV head is replicated
      on its group's ranks, which split the group's query heads evenly-as-possible.

    Every rank's query heads are either whole KV groups or part of one group, so each rank's
    query heads use its local KV heads in the model's own order (``q // kv`` per KV head). Under
    that constraint the split is byte-balanced: the largest rank holds as few query and KV heads
    as any such split allows, and no rank is idle.

    Raises:
        TPSizeError: the heads cannot be spread over ``tp`` ranks (the message lists sizes
            that work).
    """
    problem = _head_problem(num_heads, num_kv_heads, tp)
    if problem is not None:
        sizes = valid_head_tp_sizes(num_heads, num_kv_heads, max(num_heads, 1))
        raise TPSizeError(f"{problem}. Sizes that work: {sizes}")
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp:
        groups = split_even(num_kv_heads, tp)
        q = Partition(tuple(g * group for g in groups))
        kv = Partition(groups)
        return HeadPartition(num_heads, num_kv_heads, q, tuple(kv.range(r) for r in range(tp)))
    q_sizes: list[int] = []
    kv_ranges: list[tuple[int, int]] = []
    for kv_head, holders in enumerate(split_even(tp, num_kv_heads)):
        for share in split_even(group, holders):
            q_sizes.append(share)
            kv_ranges.append((kv_head, kv_head + 1))
    return HeadPartition(num_heads, num_kv_heads, Partition(tuple(q_sizes)), tuple(kv_ranges))
