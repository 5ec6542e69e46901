"""Parity suite: sharded vs unsharded on real gloo ranks (fp32, tiny random configs)."""

from __future__ import annotations

import pytest

from parity_cases import CASES
from parity_worker import parity

PARAMS = [pytest.param(c.id, tp, id=f"{c.id}-tp{tp}") for c in CASES for tp in c.tps]


@pytest.mark.distributed
@pytest.mark.parametrize("case_id,tp", PARAMS)
def test_sharded_matches_unsharded(rank_pool, case_id, tp):
    results = rank_pool(tp).run(parity, case_id, tp)
    for rank, r in enumerate(results):
        assert r["rel_err"] <= 1e-5, f"rank {rank}: relative error {r['rel_err']:.2e}"
        assert r["tokens_equal"], f"rank {rank}: greedy tokens differ"
        if "counts" in r:
            # two all-reduces per block + one for the vocab embedding; one gather of logits
            assert r["counts"] == {"all_reduce": 2 * r["layers"] + 1, "all_gather": 1}, r["counts"]
