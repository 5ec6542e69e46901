"""The coverage tier (``pytest -m coverage tests/coverage``; deselected by default): the real
sweep of ``xtp coverage --tp 2,3`` over every LM type of the installed transformers.

Fails on any WRONG result (a sharded model whose numbers differ from the unsharded one), and
when the committed results (``bench/coverage-transformers<major>.json``, which README's coverage
table is generated from) no longer match what the code does: a verdict that changed, a type
added or gone. Results cut short by the per-type time limit are not compared (a loaded machine
is not a change in the code).

Two sweeps, selected with ``-k``: ``all`` (every type; ~10 min on 2 cores) and ``sample`` (a
fixed sample of architectures, about a minute: what CI runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from xtp.bench.coverage import model_types, sweep
from xtp.bench.coverage_report import wrong

pytestmark = [pytest.mark.coverage, pytest.mark.distributed, pytest.mark.slow]

MAJOR = transformers.__version__.split(".")[0]
RESULTS = Path(__file__).resolve().parents[2] / "bench" / f"coverage-transformers{MAJOR}.json"
REDO = (f"re-run `xtp coverage --tp 2,3 --out bench/{RESULTS.name}` (and "
        "`python ci/gen_readme.py` for transformers 5) and commit both")


# dense MHA/GQA, fused qkv (several layouts), MoE, latent attention, encoder, seq2seq, and the
# types the sweep found wrong once
SAMPLE = ("llama", "gpt2", "gpt_bigcode", "falcon", "phi3", "bloom", "mixtral", "qwen3_moe",
          "deepseek_v3", "codegen", "deepseek_v4", "bert", "t5", "bart")


@pytest.fixture(scope="module", params=["sample", "all"])
def results(request) -> dict:
    only = SAMPLE if request.param == "sample" else None
    doc = sweep(model_types(only=only), [2, 3], timeout_s=120.0, say=lambda line: print(line))
    return dict(doc, sweep=request.param)


def test_no_wrong_results(results):
    assert wrong(results) == [], "sharded numbers differ from the unsharded model"


def _timed_out(entry: dict) -> bool:
    return entry["verdict"] == "error" and entry.get("reason", "").startswith("no result after")


def test_committed_results_match_the_code(results):
    assert RESULTS.exists(), f"{RESULTS} is missing: {REDO}"
    committed = json.loads(RESULTS.read_text())
    ran = set(results["types"])
    changed = sorted(set(committed["types"]) ^ ran) if results["sweep"] == "all" else []
    for name in sorted(set(committed["types"]) & ran):
        for tp, entry in results["types"][name]["tp"].items():
            old = committed["types"][name]["tp"].get(tp)
            if old is None or (old["verdict"] != entry["verdict"]
                               and not _timed_out(old) and not _timed_out(entry)):
                changed.append(f"{name}@{tp}: {old and old['verdict']} -> {entry['verdict']}")
    assert not changed, f"{RESULTS.name} is out of date ({', '.join(changed)}): {REDO}"
