"""Checkpoint formats and dtypes on real gloo ranks (tp 2): multi-file safetensors index,
PyTorch ``.bin`` index (fallback reader), a bf16 checkpoint loaded as fp32 and written back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from load_worker import (
    build_case,
    load_and_compare,
    load_per_rank_folder,
    needs_meta_planning,
    save_case,
)

pytestmark = [pytest.mark.distributed, needs_meta_planning]


def _check(results, tp):
    for rank, r in enumerate(results):
        assert not r["diffs"], f"rank {rank}: {r['diffs'][:5]}"
        assert r["rel_err"] <= 1e-6
        assert not r["whole_sharded"], r["whole_sharded"]
        if "presharded_diffs" in r:
            assert not r["presharded_diffs"], r["presharded_diffs"][:5]
            assert r["presharded_files"] == [f"rank-{rank}-of-{tp}.safetensors"]


def save_bin(case_id: str, folder, parts: int = 2):
    """``pytorch_model-*.bin`` files + index (transformers 5 no longer writes .bin)."""
    model = build_case(case_id)
    sd = model.state_dict()
    for k in list(getattr(model, "all_tied_weights_keys", {}) or {}):
        sd.pop(k, None)
    keys = list(sd)
    folder.mkdir(parents=True)
    weight_map = {}
    for i in range(parts):
        name = f"pytorch_model-{i + 1:05d}-of-{parts:05d}.bin"
        chunk = keys[i::parts]
        torch.save({k: sd[k].clone() for k in chunk}, folder / name)
        weight_map.update(dict.fromkeys(chunk, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    model.config.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("case_id", ["llama", "qwen2_moe"])
def test_multi_file_safetensors_index(rank_pool, tmp_path, case_id):
    folder = save_case(case_id, tmp_path / "ckpt", max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    results = rank_pool(2).run(load_and_compare, case_id, str(folder), 2)
    _check(results, 2)
    assert len(set(results[0]["files"])) > 2, results[0]["files"]


@pytest.mark.parametrize("case_id", ["llama", "gpt2"])
def test_pytorch_bin_fallback(rank_pool, tmp_path, case_id):
    folder = save_bin(case_id, tmp_path / "bin")
    results = rank_pool(2).run(load_and_compare, case_id, str(folder), 2, str(tmp_path / "pre"))
    _check(results, 2)
    assert sorted(results[0]["files"]) == sorted(p.name for p in folder.glob("*.bin"))


def test_bf16_checkpoint_loaded_as_fp32_and_written_back(rank_pool, tmp_path):
    import xtp

    folder = save_case("qwen2", tmp_path / "bf16", dtype=torch.bfloat16)
    pre = tmp_path / "pre"
    results = rank_pool(2).run(load_and_compare, "qwen2", str(folder), 2, str(pre),
                               torch.float32)
    _check(results, 2)
    stored = load_file(str(pre / "rank-0-of-2.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float32}
    back = xtp.gather(pre, tmp_path / "back", dtype=torch.bfloat16)
    got, want = load_file(str(back / "model.safetensors")), load_file(
        str(folder / "model.safetensors"))
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"


def test_ranks_loading_different_models_fail_together(rank_pool, tmp_path):
    a = save_case("llama", tmp_path / "a")
    b = save_case("mistral", tmp_path / "b")
    results = rank_pool(2).run(load_per_rank_folder, [str(a), str(b)], 2)
    assert all(r.startswith("RanksDisagreeError") for r in results), results
