"""Verdicts of the coverage sweep, merging the ranks' outcomes, and the rendered table."""

from __future__ import annotations

import math

import pytest

from xtp.bench.coverage import merge
from xtp.bench.coverage_report import (
    counts,
    describe,
    failures,
    markdown,
    split_bound,
    summary,
    table,
    verdict,
    wrong,
)


def ran(rel=1e-7, tokens=True, frac=0.5):
    return {"status": "ran", "rel_err": rel, "tokens_equal": tokens, "max_fraction": frac}


def test_split_bound_allows_the_same_replicated_share_at_every_tp():
    assert split_bound(2) == pytest.approx(0.8)
    assert split_bound(3) == pytest.approx(0.6 + 0.4 / 3)
    assert split_bound(4) == pytest.approx(0.7)


@pytest.mark.parametrize("result,tp,want", [
    (ran(frac=0.8), 2, "split"),
    (ran(frac=0.81), 2, "not_split"),
    (ran(frac=0.75), 3, "not_split"),
    (ran(frac=0.73), 3, "split"),
    (ran(rel=1e-5), 2, "split"),
    (ran(rel=1.1e-5), 2, "wrong"),
    (ran(tokens=False), 2, "wrong"),
    (ran(rel=math.nan), 2, "wrong"),
    (ran(rel=math.inf, frac=1.0), 2, "wrong"),
    ({"status": "refused", "reason": "x"}, 2, "refused"),
    ({"status": "cannot_build", "reason": "x"}, 3, "cannot_build"),
    ({"status": "error", "reason": "x"}, 3, "error"),
])
def test_verdict(result, tp, want):
    assert verdict(result, tp) == want


def _rank(status="ran", rel=1e-7, tokens=True, held=50, full=100, reason=""):
    out = {"status": status, "reason": reason}
    if status == "ran":
        out.update(rel_err=rel, tokens_equal=tokens, held_bytes=held, full_bytes=full,
                   tokens_via="generate")
    return out


def test_merge_takes_the_worst_rank():
    got = merge([_rank(rel=1e-8, held=40), _rank(rel=2e-6, tokens=False, held=60)])
    assert got == {"status": "ran", "rel_err": 2e-6, "tokens_equal": False,
                   "max_fraction": 0.6, "tokens_via": "generate"}


def test_merge_of_disagreeing_ranks_is_an_error_naming_each():
    got = merge([_rank("refused", reason="no"), _rank()])
    assert got["status"] == "error"
    assert got["reason"] == "ranks disagree: rank 0: refused no; rank 1: ran"


def test_merge_keeps_a_shared_reason():
    assert merge([_rank("refused", reason="why")] * 2) == {"status": "refused", "reason": "why"}


def _doc():
    def e(result, tp):
        return dict(result, verdict=verdict(result, tp))
    return {"transformers": "5.0", "torch": "2.13", "date": "2026-12-03", "tps": [2, 3],
            "types": {
                "llama": {"kind": "causal", "tp": {"2": e(ran(frac=0.5), 2),
                                                   "3": e(ran(frac=0.4), 3)}},
                "odd": {"kind": "masked", "tp": {"2": e(ran(frac=0.9), 2),
                                                 "3": e({"status": "refused",
                                                         "reason": "a | b\nc"}, 3)}},
                "bad": {"kind": "seq2seq", "tp": {"2": e(ran(rel=0.5), 2),
                                                  "3": e(ran(frac=0.4), 3)}},
                "nope": {"kind": "causal", "tp": {"2": e({"status": "cannot_build",
                                                          "reason": "r"}, 2),
                                                  "3": e({"status": "cannot_build",
                                                          "reason": "r"}, 3)}}}}


def test_counts_summary_and_wrong():
    doc = _doc()
    assert counts(doc, 2) == {"split": 1, "not_split": 1, "wrong": 1, "cannot_build": 1}
    assert summary(doc).splitlines() == [
        "tp 2: 1 / 3 correct+split (33%) of the types that build tiny; 1 correct, not split, "
        "1 WRONG; 1 cannot build tiny",
        "tp 3: 2 / 3 correct+split (67%) of the types that build tiny; 1 refused; "
        "1 cannot build tiny"]
    assert wrong(doc) == ["bad@2"]


def test_table_rows_and_cells():
    lines = table(_doc()).splitlines()
    assert lines[:2] == ["| model_type | kind | tp 2 | tp 3 |", "|---|---|---|---|"]
    assert lines[2] == ("| bad | seq2seq | **WRONG** (rel. error 0.5, tokens equal) | "
                        "correct+split (0.40) |")
    assert lines[3] == "| llama | causal | correct+split (0.50) | correct+split (0.40) |"
    assert lines[5] == "| odd | masked | correct, not split (0.90) | refused: a / b c |"


def test_describe_shortens_long_reasons():
    cell = describe({"verdict": "refused", "reason": "x" * 500})
    assert cell.startswith("refused: xxx") and cell.endswith("...") and len(cell) < 200


def test_failures_list_skips_types_that_never_build():
    assert failures(_doc()) == [
        "- `bad` (seq2seq): tp 2: **WRONG** (rel. error 0.5, tokens equal)",
        "- `odd` (masked): tp 2: correct, not split (0.90); tp 3: refused: a / b c"]


def test_markdown_has_versions_bounds_summary_and_table():
    text = markdown(_doc())
    assert text.startswith('transformers 5.0, torch 2.13, 2026-12-03; bound for "split": '
                           "the rank holding most holds at most 0.80 (tp 2), 0.73 (tp 3)")
    assert "* tp 2: 1 / 3 correct+split" in text
    assert text.endswith(table(_doc()))
