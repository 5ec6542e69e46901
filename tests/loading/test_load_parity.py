"""Loading straight into shards, for every architecture of the parity suite, on real gloo ranks.

Per (case, tp), one rank task (cached, shared by the tests below) loads the case's checkpoint
with ``xtp.from_pretrained`` and with ``transformers`` + ``xtp.shard``, then round-trips it
through ``xtp.save_sharded``. The pytest process then gathers the pre-sharded folder back and
pre-shards the original offline. Tier: real processes, real collectives (CPU, gloo).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from load_worker import (
    auto_class,
    build_case,
    case_by_id,
    load_and_compare,
    needs_meta_planning,
    save_case,
)
from parity_cases import CASES

pytestmark = needs_meta_planning

PARAMS = [pytest.param(c.id, tp, id=f"{c.id}-tp{tp}") for c in CASES
          for tp in ([t for t in c.tps if t in (2, 3)] or [min(c.tps)])]
_results: dict = {}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("load")


def checkpoint(root, case_id: str):
    folder = root / f"ckpt-{case_id}"
    if not folder.exists():
        save_case(case_id, folder)
    return folder


def run(rank_pool, root, case_id: str, tp: int) -> dict:
    key = (case_id, tp)
    if key not in _results:
        folder = checkpoint(root, case_id)
        out = root / f"pre-{case_id}-tp{tp}"
        ranks = rank_pool(tp).run(load_and_compare, case_id, str(folder), tp, str(out))
        _results[key] = {"ranks": ranks, "folder": folder, "out": out}
    return _results[key]


def read_all(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, f"tensors differ: {bad[:5]}"


@pytest.mark.distributed
@pytest.mark.parametrize("case_id,tp", PARAMS)
def test_from_pretrained_matches_shard(rank_pool, root, case_id, tp):
    for rank, r in enumerate(run(rank_pool, root, case_id, tp)["ranks"]):
        assert not r["diffs"], f"rank {rank}: {r['diffs'][:5]}"
        assert r["rel_err"] <= 1e-6, f"rank {rank}: relative error {r['rel_err']:.2e}"


@pytest.mark.distributed
@pytest.mark.parametrize("case_id,tp", PARAMS)
def test_each_rank_reads_only_its_slices(rank_pool, root, case_id, tp):
    for rank, r in enumerate(run(rank_pool, root, case_id, tp)["ranks"]):
        assert not r["whole_sharded"], f"rank {rank} read whole: {r['whole_sharded'][:5]}"
        assert r["bytes_read"] == r["local_bytes"], (rank, r["bytes_read"], r["local_bytes"])
        assert r["bytes_read"] <= r["plan_bytes"], (rank, r["bytes_read"], r["plan_bytes"])


@pytest.mark.distributed
@pytest.mark.parametrize("case_id,tp", PARAMS)
def test_save_sharded_round_trip_reads_own_file(rank_pool, root, case_id, tp):
    for rank, r in enumerate(run(rank_pool, root, case_id, tp)["ranks"]):
        assert not r["presharded_diffs"], f"rank {rank}: {r['presharded_diffs'][:5]}"
        assert r["presharded_equal_output"], f"rank {rank}: outputs differ"
        assert r["presharded_files"] == [f"rank-{rank}-of-{tp}.safetensors"]


@pytest.mark.distributed
@pytest.mark.parametrize("case_id,tp", PARAMS)
def test_gather_gives_back_the_original_checkpoint(rank_pool, root, case_id, tp):
    import xtp

    res = run(rank_pool, root, case_id, tp)
    out = root / f"gathered-{case_id}-tp{tp}"
    xtp.gather(res["out"], out)
    assert_same_tensors(read_all(out), read_all(res["folder"]))
    loaded = auto_class(case_by_id(case_id).kind).from_pretrained(str(out))
    assert_same_tensors(loaded.state_dict(), build_case(case_id).state_dict())


@pytest.mark.distributed
@pytest.mark.parametrize("case_id,tp", PARAMS)
def test_preshard_cli_writes_what_save_sharded_writes(rank_pool, root, case_id, tp):
    from xtp.cli.main import main

    res = run(rank_pool, root, case_id, tp)
    out = root / f"cli-{case_id}-tp{tp}"
    assert main(["preshard", str(res["folder"]), str(out), "--tp", str(tp), "--no-progress"]) == 0
    for r in range(tp):
        name = f"rank-{r}-of-{tp}.safetensors"
        assert_same_tensors(load_file(str(out / name)), load_file(str(res["out"] / name)))
