"""Which rows of a (possibly fused) weight each rank owns, as lists of ``(start, stop)`` ranges.

A rank's shard of a dimension is the concatenation, in order, of its ranges. The same ranges
serve slicing an in-memory tensor and reading slices from a checkpoint. Shard-then-gather
returns the original tensor exactly (:func:`gather_ranges` is the inverse of
:func:`take_ranges` over all ranks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .partition import HeadPartition, Partition
from .spec import Layout, Ranges


def _scaled(rng: tuple[int, int], unit: int, offset: int = 0) -> tuple[int, int]:
    return (offset + rng[0] * unit, offset + rng[1] * unit)


def q_ranges(heads: HeadPartition, head_dim: int, rank: int) -> Ranges:
    return (_scaled(heads.q.range(rank), head_dim),)


def kv_ranges(heads: HeadPartition, head_dim: int, rank: int) -> Ranges:
    return (_scaled(heads.kv_ranges[rank], head_dim),)


def fused_ranges(
    layout: Layout,
    rank: int,
    heads: HeadPartition | None,
    head_dim: int,
    mlp: Partition | None = None,
) -> Ranges:
    """Ranges of the output rows of fused layer ``layout`` owned by ``rank``."""
    if layout == Layout.GATE_UP_CONCAT:
        assert mlp is not None
        a, b = mlp.range(rank)
        return ((a, b), (mlp.total + a, mlp.total + b))
    assert heads is not None
    H, K, D = heads.num_heads, heads.num_kv_heads, head_dim
    qa, qb = heads.q.range(rank)
    ka, kb = heads.kv_ranges[rank]
    if layout == Layout.QKV_CONCAT:
        return ((qa * D, qb * D), (H * D + ka * D, H * D + kb * D),
                (H * D + K * D + ka * D, H * D + K * D + kb * D))
    if layout == Layout.QKV_INTERLEAVED:
        return ((qa * 3 * D, qb * 3 * D),)
    if layout == Layout.QKV_GROUPED:
        g = H // K
        if not heads.kv_replicated:
            return ((ka * (g + 2) * D, kb * (g + 2) * D),)
        base = ka * (g + 2) * D
        off = qa - ka * g
        return ((base + off * D, base + (off + qb - qa) * D), (base + g * D, base + (g + 2) * D))
    raise ValueError(f"unknown fused layout {layout!r}")


def fused_width(layout: Layout, heads: HeadPartition | None, head_dim: int,
                mlp_total: int = 0) -> int:
    """Full output width a layer of ``layout`` must have."""
    if layout == Layout.GATE_UP_CONCAT:
        return 2 * mlp_total
    H, K, D = heads.num_heads, heads.num_kv_heads, head_dim
    return {Layout.QKV_CONCAT: (H + 2 * K) * D, Layout.QKV_INTERLEAVED: 3 * H * D,
            Layout.QKV_GROUPED: (H + 2 * K) * D}[layout]


def ranges_len(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def take_ranges(t: torch.Tensor, dim: int, ranges: Ranges) -> torch.Tensor:
    """This rank's shard: the concatenation of ``t``'s ranges along ``dim`` (a new tensor)."""
    pieces = [t.narrow(dim, a, b - a) for a, b in ranges]
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)
    return out.clone(memory_format=torch.contiguous_format)


def gather_ranges(
    shards: Sequence[torch.Tensor], dim: int, rank_ranges: Sequence[Ranges], total: int
) -> torch.Tensor:
    """Rebuild the full tensor from every rank's shard (replicated rows must agree)."""
    first = shards[0]
    shape = list(first.shape)
    shape[dim] = total
    out = first.new_empty(shape)
    for shard, ranges in zip(shards, rank_ranges):
        pos = 0
        for a, b in ranges:
            out.narrow(dim, a, b - a).copy_(shard.narrow(dim, pos, b - a))
            pos += b - a
    return out
