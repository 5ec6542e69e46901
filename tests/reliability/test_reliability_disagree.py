"""Ranks that were started differently (tp_size, xtp version, model, checkpoint, and with
``verify=True`` replicated weights) get a RanksDisagreeError naming the difference, on every
rank, with the model left as it was.
One world of 2 real gloo ranks runs the cases one after the other (each leaves it usable).
Different *models* through from_pretrained: tests/test_load_formats.py."""

from __future__ import annotations

import pytest

from reliability_worker import disagree_worker, run_world, tiny_model

pytestmark = pytest.mark.distributed


def test_ranks_that_disagree_are_told_what_differs(tmp_path):
    folders = []
    for seed in (0, 1):  # the same config, other weights
        folder = tmp_path / f"ckpt{seed}"
        tiny_model(seed).save_pretrained(folder)
        folders.append(str(folder))
    results, _, _ = run_world(disagree_worker, 2, (folders,), {"XTP_TIMEOUT": "20"})
    assert sorted(results) == [0, 1], results
    for ok, out in results.values():
        assert ok, out
        assert "tp_size (ranks 0: 2; ranks 1: 1)" in out["tp_size"]["message"]
        assert "xtp version" in out["xtp version"]["message"]
        assert "0.0.0-other" in out["xtp version"]["message"]
        assert "model config" in out["model"]["message"] and out["model"]["unchanged"]
        assert "checkpoint contents" in out["checkpoint"]["message"]
        assert "parameters differ between this rank" in out["weights"]["message"]
        assert out["same weights"]["type"] is None, out["same weights"]
        assert out["world_ok"]
