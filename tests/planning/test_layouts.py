"""Unit tests for xtp.planning.layouts: every fused layout's per-rank ranges, in memory (no
processes).

For each layout of ``spec.Layout`` and the plain q / kv projections:

* shard then gather gives back the original tensor exactly (``torch.equal``), along dim 0
  (``nn.Linear``: out x in) and dim 1 (transformers ``Conv1D``: in x out);
* every row is owned by at least one rank; by exactly one unless KV heads are replicated
  (then only the K/V rows repeat, query rows never do);
* each rank's shard is itself the same layout for its *local* heads, which is what the model's
  unchanged forward code (splitting with the local head counts) needs. The expected row order
  is built here from each layout's definition, independently of xtp.planning.layouts.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xtp.planning.layouts import (
    fused_ranges,
    fused_width,
    gather_ranges,
    kv_ranges,
    q_ranges,
    ranges_len,
    take_ranges,
)
from xtp.planning.partition import Partition, partition_heads, split_even
from xtp.planning.spec import Layout

SETTINGS = settings(max_examples=120, deadline=None)
HEAD_LAYOUTS = (Layout.QKV_CONCAT, Layout.QKV_INTERLEAVED, Layout.QKV_GROUPED)


def test_layouts_table_is_what_this_file_covers():
    assert set(Layout) == {*HEAD_LAYOUTS, Layout.GATE_UP_CONCAT}


# -- row labels from each layout's definition ----------------------------------------------------


def qkv_labels(layout: str, q_heads: list[int], kv_heads: list[int], group: int,
               head_dim: int) -> list[tuple]:
    """Row labels ``(part, head, d)`` of a fused QKV weight holding ``q_heads`` / ``kv_heads``."""

    def rows(part, head):
        return [(part, head, d) for d in range(head_dim)]

    out: list[tuple] = []
    if layout == Layout.QKV_CONCAT:  # [q heads | k heads | v heads]
        for h in q_heads:
            out += rows("q", h)
        for part in ("k", "v"):
            for k in kv_heads:
                out += rows(part, k)
    elif layout == Layout.QKV_INTERLEAVED:  # per head [q, k, v] (one KV head per query head)
        assert q_heads == kv_heads
        for h in q_heads:
            out += rows("q", h) + rows("k", h) + rows("v", h)
    elif layout == Layout.QKV_GROUPED:  # per KV group [its q heads.., k, v]
        for k in kv_heads:
            for h in q_heads:
                if h // group == k:
                    out += rows("q", h)
            out += rows("k", k) + rows("v", k)
    else:
        raise AssertionError(layout)
    return out


def gate_up_labels(features: list[int]) -> list[tuple]:
    return [("gate", f) for f in features] + [("up", f) for f in features]


# -- strategies ----------------------------------------------------------------------------------


@st.composite
def head_cases(draw, layout: str):
    """(HeadPartition, head_dim) for a head layout the layout can hold and tp that works."""
    if layout == Layout.QKV_INTERLEAVED:
        num_kv = num_heads = draw(st.integers(1, 12))
    else:
        num_kv = draw(st.integers(1, 6))
        num_heads = num_kv * draw(st.integers(1, 4))
    tps = [tp for tp in range(1, 17)
           if tp <= num_heads and (num_kv >= tp or tp % num_kv == 0)]
    tp = draw(st.sampled_from(tps))
    head_dim = draw(st.integers(1, 4))
    return partition_heads(num_heads, num_kv, tp), head_dim


def round_trip(width: int, rank_ranges, dim: int, cols: int = 3) -> None:
    """Shard an ``arange`` tensor by ``rank_ranges`` along ``dim``, gather it back, compare."""
    full = torch.arange(width * cols, dtype=torch.float64).reshape(width, cols)
    if dim == 1:
        full = full.T.contiguous()  # Conv1D: (in_features, out_features)
    shards = [take_ranges(full, dim, rr) for rr in rank_ranges]
    for shard, rr in zip(shards, rank_ranges):
        assert shard.shape[dim] == ranges_len(rr)
        assert shard.shape[1 - dim] == cols
        assert shard.is_contiguous()
    back = gather_ranges(shards, dim, rank_ranges, width)
    assert torch.equal(back, full)


def owners(width: int, rank_ranges) -> list[int]:
    count = [0] * width
    for rr in rank_ranges:
        for a, b in rr:
            assert 0 <= a <= b <= width, f"range {(a, b)} outside [0, {width})"
            for i in range(a, b):
                count[i] += 1
    return count


def rows_of(rr) -> list[int]:
    return [i for a, b in rr for i in range(a, b)]


# -- fused QKV layouts ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("dim", [0, 1], ids=["linear", "conv1d"])
@SETTINGS
@given(data=st.data())
def test_qkv_layout_round_trip_ownership_and_local_layout(layout, dim, data):
    hp, head_dim = data.draw(head_cases(layout))
    H, K, tp = hp.num_heads, hp.num_kv_heads, hp.tp
    group = H // K
    width = fused_width(layout, hp, head_dim)
    labels = qkv_labels(layout, list(range(H)), list(range(K)), group, head_dim)
    assert len(labels) == width

    rank_ranges = [fused_ranges(layout, r, hp, head_dim) for r in range(tp)]
    round_trip(width, rank_ranges, dim)

    count = owners(width, rank_ranges)
    assert min(count) >= 1, "a row no rank owns"
    if hp.kv_replicated:
        for label, n in zip(labels, count):
            if label[0] == "q":
                assert n == 1, f"query row {label} owned {n} times"
            else:
                assert n == tp // K, f"{label} owned {n} times"
    else:
        assert count == [1] * width

    for r, rr in enumerate(rank_ranges):
        qa, qb = hp.q.range(r)
        ka, kb = hp.kv_ranges[r]
        want = qkv_labels(layout, list(range(qa, qb)), list(range(ka, kb)), group, head_dim)
        got = [labels[i] for i in rows_of(rr)]
        assert got == want, f"rank {r}: shard is not {layout} for its local heads"


def test_grouped_kv_replicated_example():
    """Falcon-40B style: 8 query heads in 2 KV groups of [q q q q k v], tp 4: each rank keeps
    two query heads of one group plus that group's K and V."""
    hp = partition_heads(8, 2, 4)
    assert hp.kv_replicated
    rr = [fused_ranges(Layout.QKV_GROUPED, r, hp, 1) for r in range(4)]
    assert rr == [((0, 2), (4, 6)), ((2, 4), (4, 6)), ((6, 8), (10, 12)), ((8, 10), (10, 12))]


def test_concat_one_kv_head_example():
    """GPT-BigCode multi-query: [12 q | 1 k | 1 v] over 3 ranks, K and V on every rank."""
    hp = partition_heads(12, 1, 3)
    assert [fused_ranges(Layout.QKV_CONCAT, r, hp, 1) for r in range(3)] == [
        ((0, 4), (12, 13), (13, 14)), ((4, 8), (12, 13), (13, 14)),
        ((8, 12), (12, 13), (13, 14))]


# -- gate|up ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1], ids=["linear", "conv1d"])
@SETTINGS
@given(total=st.integers(1, 60), tp=st.integers(1, 16))
def test_gate_up_round_trip_and_local_layout(dim, total, tp):
    if tp > total:
        return
    mlp = Partition(split_even(total, tp))
    width = fused_width(Layout.GATE_UP_CONCAT, None, 0, total)
    assert width == 2 * total
    rank_ranges = [fused_ranges(Layout.GATE_UP_CONCAT, r, None, 0, mlp) for r in range(tp)]
    round_trip(width, rank_ranges, dim)
    assert owners(width, rank_ranges) == [1] * width
    labels = gate_up_labels(list(range(total)))
    for r, rr in enumerate(rank_ranges):
        a, b = mlp.range(r)
        assert [labels[i] for i in rows_of(rr)] == gate_up_labels(list(range(a, b)))


# -- plain q / k / v projections -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["q", "kv"])
@pytest.mark.parametrize("dim", [0, 1], ids=["linear", "conv1d"])
@SETTINGS
@given(data=st.data())
def test_plain_projection_round_trip(which, dim, data):
    hp, head_dim = data.draw(head_cases(Layout.QKV_CONCAT))
    if which == "q":
        width = hp.num_heads * head_dim
        rank_ranges = [q_ranges(hp, head_dim, r) for r in range(hp.tp)]
        heads = [hp.q.range(r) for r in range(hp.tp)]
    else:
        width = hp.num_kv_heads * head_dim
        rank_ranges = [kv_ranges(hp, head_dim, r) for r in range(hp.tp)]
        heads = list(hp.kv_ranges)
    round_trip(width, rank_ranges, dim)
    count = owners(width, rank_ranges)
    assert min(count) >= 1
    if which == "q" or not hp.kv_replicated:
        assert count == [1] * width
    for rr, (a, b) in zip(rank_ranges, heads):
        assert rows_of(rr) == list(range(a * head_dim, b * head_dim))


# -- helpers' contracts ----------------------------------------------------------------------------


def test_take_ranges_copies():
    t = torch.arange(12.0).reshape(6, 2)
    shard = take_ranges(t, 0, ((1, 3),))
    shard.zero_()
    assert t[1, 0] == 2.0, "take_ranges must return a new tensor, not a view"


def test_unknown_layout():
    with pytest.raises(ValueError, match="unknown fused layout"):
        fused_ranges("qkv_diagonal", 0, partition_heads(4, 4, 2), 2)
