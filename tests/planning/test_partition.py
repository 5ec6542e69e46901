"""Unit tests (pure math, no torch) for xtp.planning.partition: split_even, split_aligned,
partition_heads.

Property tests draw head layouts the way real models have them: ``num_kv_heads`` KV heads, each
shared by ``group`` query heads (``num_heads = num_kv_heads * group``), query head ``h`` using KV
head ``h // group``, and tp from 1 to 16.
"""

from __future__ import annotations

import ast
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xtp.errors import TPSizeError
from xtp.planning.partition import (
    Partition,
    partition_heads,
    split_aligned,
    split_even,
    valid_head_tp_sizes,
)

SETTINGS = settings(max_examples=300, deadline=None)


def works(num_heads: int, num_kv_heads: int, tp: int) -> bool:
    """Oracle: a head layout takes ``tp`` ranks iff every rank gets a query head (issue 17: with
    fewer KV heads than ranks, tp no longer has to be a multiple of the KV head count)."""
    return tp <= num_heads


def working_sizes(num_heads: int, num_kv_heads: int) -> list[int]:
    return [tp for tp in range(1, num_heads + 1) if works(num_heads, num_kv_heads, tp)]


def listed_sizes(message: str) -> list[int]:
    """The list after "Sizes that work:" in a TPSizeError message."""
    found = re.search(r"[Ss]izes that work: (\[[\d, ]*\])", message)
    assert found, f"no list of working sizes in: {message}"
    return ast.literal_eval(found.group(1))


head_layouts = st.tuples(
    st.integers(1, 16),  # num_kv_heads
    st.integers(1, 8),   # query heads per KV head
    st.integers(1, 16),  # tp
).map(lambda t: (t[0] * t[1], t[0], t[2]))


# -- split_even ----------------------------------------------------------------------------------


@SETTINGS
@given(total=st.integers(0, 10_000), parts=st.integers(1, 64))
def test_split_even_sizes_differ_by_at_most_one_larger_first(total, parts):
    sizes = split_even(total, parts)
    assert len(sizes) == parts
    assert sum(sizes) == total
    assert max(sizes) - min(sizes) <= 1
    assert list(sizes) == sorted(sizes, reverse=True)


def test_split_even_example_six_over_four():
    assert split_even(6, 4) == (2, 2, 1, 1)


@pytest.mark.parametrize("parts", [0, -1])
def test_split_even_rejects_fewer_than_one_part(parts):
    with pytest.raises(TPSizeError) as info:
        split_even(8, parts)
    assert type(info.value) is TPSizeError
    assert str(parts) in str(info.value)


# -- split_aligned -------------------------------------------------------------------------------


def expected_unit(total: int, parts: int, align: int) -> int:
    """The docstring's definition: the largest of align, align/2, ..., 1 that divides total and
    leaves every rank at least one unit."""
    unit = align
    while unit > 1:
        if total % unit == 0 and total // unit >= parts:
            return unit
        unit //= 2
    return 1


@SETTINGS
@given(total=st.integers(1, 4096), parts=st.integers(1, 16),
       align=st.sampled_from([1, 2, 4, 8, 16]))
def test_split_aligned_units(total, parts, align):
    sizes = split_aligned(total, parts, align)
    unit = expected_unit(total, parts, align)
    assert len(sizes) == parts
    assert sum(sizes) == total
    assert all(s % unit == 0 for s in sizes), (sizes, unit)
    assert max(sizes) - min(sizes) <= unit
    assert list(sizes) == sorted(sizes, reverse=True)
    if total >= parts:
        assert min(sizes) >= 1, "every rank gets at least one unit when that is possible"


def test_split_aligned_examples():
    assert split_aligned(120, 3) == (40, 40, 40)       # 15 units of 8: 5/5/5
    assert split_aligned(120, 4) == (32, 32, 32, 24)   # 15 units of 8: 4/4/4/3
    assert split_aligned(60, 2) == (32, 28)            # 60 = 15 x 4: 8/7 units of 4
    assert split_aligned(7, 2) == (4, 3)               # odd: unit 1
    assert split_aligned(16, 4, align=16) == (4, 4, 4, 4)  # unit 16 would starve ranks


# -- Partition -----------------------------------------------------------------------------------


@SETTINGS
@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=16), unit=st.integers(1, 8))
def test_partition_ranges_tile_the_dimension(sizes, unit):
    p = Partition(tuple(sizes))
    assert p.total == sum(sizes)
    pos = 0
    for r in range(len(sizes)):
        a, b = p.range(r)
        assert a == pos == p.starts[r] and b - a == sizes[r]
        pos = b
    assert pos == p.total
    assert p.scaled(unit).sizes == tuple(s * unit for s in sizes)
    assert p.is_even == (len(set(sizes)) == 1)


# -- partition_heads: valid layouts -------------------------------------------------------------


@SETTINGS
@given(head_layouts)
def test_partition_heads_properties(layout):
    num_heads, num_kv_heads, tp = layout
    if not works(num_heads, num_kv_heads, tp):
        return  # the error cases are tested below
    group = num_heads // num_kv_heads
    hp = partition_heads(num_heads, num_kv_heads, tp)
    assert (hp.num_heads, hp.num_kv_heads, hp.tp) == (num_heads, num_kv_heads, tp)
    assert len(hp.q.sizes) == len(hp.kv_ranges) == tp

    # every query head is owned exactly once, and every rank has at least one
    owners = [0] * num_heads
    for r in range(tp):
        a, b = hp.q.range(r)
        assert b > a, f"rank {r} has no query head"
        assert hp.local_heads(r) == b - a
        for h in range(a, b):
            owners[h] += 1
    assert owners == [1] * num_heads

    # each rank's KV heads are exactly those its query heads use (h -> h // group)
    for r in range(tp):
        a, b = hp.q.range(r)
        ka, kb = hp.kv_ranges[r]
        assert 0 <= ka < kb <= num_kv_heads
        assert hp.local_kv_heads(r) == kb - ka
        assert set(range(ka, kb)) == {h // group for h in range(a, b)}
        # the planner sets num_key_value_groups to q // kv: the division must be exact
        assert hp.local_heads(r) % hp.local_kv_heads(r) == 0

    kv_owners = [0] * num_kv_heads
    for ka, kb in hp.kv_ranges:
        for k in range(ka, kb):
            kv_owners[k] += 1
    sizes = hp.q.sizes
    if num_kv_heads >= tp:
        # whole KV groups per rank, no replication, at most one group difference
        assert not hp.kv_replicated
        assert kv_owners == [1] * num_kv_heads
        assert all(s % group == 0 for s in sizes)
        assert max(sizes) - min(sizes) <= group
        assert list(sizes) == sorted(sizes, reverse=True)
    else:
        # every KV head replicated on its group's ranks (tp spread evenly over the groups, at
        # most one rank difference), which split that group's query heads evenly
        assert hp.kv_replicated
        assert max(kv_owners) - min(kv_owners) <= 1 and min(kv_owners) >= 1
        assert sum(kv_owners) == tp
        assert all(hp.local_kv_heads(r) == 1 for r in range(tp))
        for k in range(num_kv_heads):
            shares = [s for s, (ka, _) in zip(sizes, hp.kv_ranges) if ka == k]
            assert max(shares) - min(shares) <= 1
        if tp % num_kv_heads == 0:
            assert max(sizes) - min(sizes) <= 1
    # byte balance: the largest rank holds no more query heads than the lower bound of any
    # split where each rank holds whole groups or part of one group
    if num_kv_heads >= tp:
        bound = -(-num_kv_heads // tp) * group
    else:
        bound = -(-group // (tp // num_kv_heads))
    assert max(sizes) == bound


@SETTINGS
@given(head_layouts)
def test_valid_head_tp_sizes_matches_oracle(layout):
    num_heads, num_kv_heads, _ = layout
    assert valid_head_tp_sizes(num_heads, num_kv_heads, num_heads) == working_sizes(
        num_heads, num_kv_heads)


def test_six_heads_over_four_ranks():
    hp = partition_heads(6, 6, 4)
    assert hp.q.sizes == (2, 2, 1, 1)
    assert hp.kv_ranges == ((0, 2), (2, 4), (4, 5), (5, 6))
    assert not hp.kv_replicated


def test_one_kv_head_replicated_everywhere():
    hp = partition_heads(12, 1, 4)
    assert hp.q.sizes == (3, 3, 3, 3)
    assert hp.kv_ranges == ((0, 1),) * 4
    assert hp.kv_replicated


def test_two_kv_heads_over_four_ranks():
    hp = partition_heads(8, 2, 4)
    assert hp.q.sizes == (2, 2, 2, 2)
    assert hp.kv_ranges == ((0, 1), (0, 1), (1, 2), (1, 2))


def test_uneven_groups():
    hp = partition_heads(12, 4, 3)  # 4 groups of 3 over 3 ranks: 2, 1, 1 groups
    assert hp.q.sizes == (6, 3, 3)
    assert hp.kv_ranges == ((0, 2), (2, 3), (3, 4))


# -- partition_heads: errors ---------------------------------------------------------------------


def _error(num_heads, num_kv_heads, tp) -> TPSizeError:
    with pytest.raises(TPSizeError) as info:
        partition_heads(num_heads, num_kv_heads, tp)
    assert type(info.value) is TPSizeError
    return info.value


@SETTINGS
@given(head_layouts)
def test_invalid_tp_raises_tpsizeerror_listing_working_sizes(layout):
    num_heads, num_kv_heads, tp = layout
    if works(num_heads, num_kv_heads, tp):
        return
    err = _error(num_heads, num_kv_heads, tp)
    assert f"tp_size={tp}" in str(err)
    assert listed_sizes(str(err)) == working_sizes(num_heads, num_kv_heads)


def test_tp_larger_than_heads_message():
    err = _error(6, 6, 8)
    msg = str(err)
    assert "larger than the number of attention heads (6)" in msg
    assert listed_sizes(msg) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("tp", [0, -2])
def test_tp_below_one(tp):
    assert "must be >= 1" in str(_error(8, 8, tp))


@pytest.mark.parametrize("num_heads,num_kv_heads", [(12, 5), (8, 0)])
def test_heads_that_do_not_group(num_heads, num_kv_heads):
    assert "cannot be grouped" in str(_error(num_heads, num_kv_heads, 2))


# GQA layouts (1 < K < H), where some tp <= H fail: building the message must not recurse
# (it did before f3fb2c2: RecursionError instead of TPSizeError for any GQA model at a bad tp).
# The tp sizes that are not a multiple of the KV head count were refused here before issue 17
# ("multiple of 3" etc.); they are partitions now (test_gqa_tp_not_a_multiple_of_kv_heads).
GQA_BAD = [
    pytest.param(64, 8, 128, "larger than the number of attention heads", id="llama70b-tp128"),
    pytest.param(12, 3, 13, "larger than the number of attention heads", id="K3-tp13"),
]


@pytest.mark.parametrize("num_heads,num_kv_heads,tp,phrase", GQA_BAD)
def test_gqa_bad_tp_raises_tpsizeerror_listing_working_sizes(num_heads, num_kv_heads, tp, phrase):
    err = _error(num_heads, num_kv_heads, tp)
    assert phrase in str(err)
    assert listed_sizes(str(err)) == working_sizes(num_heads, num_kv_heads)


def test_valid_head_tp_sizes_llama70b():
    assert valid_head_tp_sizes(64, 8, 64) == list(range(1, 65))


@pytest.mark.parametrize("num_heads,num_kv_heads,tp,q_sizes,kv_ranges", [
    # 4 heads / 2 KV heads at tp 3: KV head 0 on ranks 0 and 1, which split its two queries
    (4, 2, 3, (1, 1, 2), ((0, 1), (0, 1), (1, 2))),
    # 32 / 8 at tp 6: whole groups, 2, 2, 1, 1, 1, 1 (a rank may not mix parts of two groups)
    (32, 8, 6, (8, 8, 4, 4, 4, 4), ((0, 2), (2, 4), (4, 5), (5, 6), (6, 7), (7, 8))),
    # 12 / 4 at tp 5: group 0 split over ranks 0 and 1, groups 1-3 whole
    (12, 4, 5, (2, 1, 3, 3, 3), ((0, 1), (0, 1), (1, 2), (2, 3), (3, 4))),
    # 12 / 3 at tp 4, 12 / 6 at tp 8 (both refused before issue 17)
    (12, 3, 4, (2, 2, 4, 4), ((0, 1), (0, 1), (1, 2), (2, 3))),
    (12, 6, 8, (1, 1, 1, 1, 2, 2, 2, 2),
     ((0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6))),
])
def test_gqa_tp_not_a_multiple_of_kv_heads(num_heads, num_kv_heads, tp, q_sizes, kv_ranges):
    hp = partition_heads(num_heads, num_kv_heads, tp)
    assert hp.q.sizes == q_sizes
    assert hp.kv_ranges == kv_ranges


def _compositions(total: int, parts: int):
    """Every way to write ``total`` as ``parts`` positive ints, in order."""
    if parts == 1:
        yield (total,)
        return
    for first in range(1, total - parts + 2):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


@pytest.mark.parametrize("num_heads,num_kv_heads,tp", [(32, 8, 6), (12, 4, 5), (4, 2, 3),
                                                       (12, 3, 4), (6, 2, 4)])
def test_largest_rank_is_as_small_as_any_valid_split(num_heads, num_kv_heads, tp):
    """Brute force over every contiguous split of the query heads in which each rank holds whole
    KV groups or part of one group (so its queries use its KV heads in the model's order, no KV
    head twice on a rank): none has a smaller largest rank (q, k, v and o bytes: 2 per query head
    + 2 per KV head) than partition_heads'. 32 / 8 at tp 6: 8 query heads on the largest rank is
    that optimum (6 would need a KV head duplicated within a rank)."""
    group = num_heads // num_kv_heads

    def cost(q_sizes):
        out, start = [], 0
        for q in q_sizes:
            first, last = start // group, (start + q - 1) // group
            whole = start % group == 0 and q % group == 0
            if not whole and first != last:
                return None
            out.append(2 * q + 2 * (last - first + 1))
            start += q
        return max(out)

    best = min(c for sizes in _compositions(num_heads, tp) if (c := cost(sizes)) is not None)
    assert cost(partition_heads(num_heads, num_kv_heads, tp).q.sizes) == best
