"""Verdicts of ``xtp coverage`` and their rendering (pure functions: no ranks, no models).

A result of one model type at one tp size (what :mod:`xtp.bench.coverage` merges from its
ranks) gets one verdict:

* ``split``: correct (logits rel. error <= ``REL_TOL`` in fp32, the same greedy tokens) and
  split: the rank holding the most parameter bytes holds at most :func:`split_bound` of them;
* ``not_split``: correct, but (mostly) replicated;
* ``wrong``: the sharded model's numbers differ: always a bug, the command exits non-zero;
* ``refused``: xtp raised a typed error (its one-line reason is kept);
* ``cannot_build``: the tiny model does not build or run unsharded (not xtp's doing);
* ``error``: sharding or the sharded forward crashed, hung or the ranks disagreed.
"""

from __future__ import annotations

import math
from collections import Counter

REL_TOL = 1e-5
# At tp 2 a rank may hold at most 0.8 of the weights. That allows 60% of the bytes to be
# replicated (0.6 + 0.4 / 2 = 0.8); the same replicated share gives the bound at any tp:
# 0.6 + 0.4 / tp (tp 3: 0.733, tp 4: 0.7).
REPLICATED_SHARE = 0.6
LABELS = {"split": "correct+split", "not_split": "correct, not split", "wrong": "WRONG",
          "refused": "refused", "cannot_build": "cannot build", "error": "error"}


def split_bound(tp: int) -> float:
    """The most a rank may hold (fraction of parameter bytes) for ``split`` at ``tp``."""
    return REPLICATED_SHARE + (1 - REPLICATED_SHARE) / tp


def verdict(result: dict, tp: int) -> str:
    """The verdict of one merged result (``status``, and for ``ran``: ``rel_err``,
    ``tokens_equal``, ``max_fraction``)."""
    status = result["status"]
    if status != "ran":
        return status
    rel = result["rel_err"]
    if not (isinstance(rel, float) and math.isfinite(rel)) or rel > REL_TOL \
            or not result["tokens_equal"]:
        return "wrong"
    return "split" if result["max_fraction"] <= split_bound(tp) + 1e-12 else "not_split"


def describe(entry: dict, limit: int = 160) -> str:
    """One cell of the table: the label, the fraction held (``ran``) or the reason (cut to
    ``limit`` characters)."""
    v = entry["verdict"]
    if v in ("split", "not_split"):
        return f"{LABELS[v]} ({entry['max_fraction']:.2f})"
    if v == "wrong":
        return (f"**WRONG** (rel. error {entry['rel_err']:.2g}, tokens "
                f"{'equal' if entry['tokens_equal'] else 'differ'})")
    reason = entry.get("reason", "")
    return f"{LABELS[v]}: {_short(reason, limit)}" if reason else LABELS[v]


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def counts(results: dict, tp: int) -> Counter:
    """How many types got each verdict at ``tp``."""
    return Counter(t["tp"][str(tp)]["verdict"] for t in results["types"].values()
                   if str(tp) in t["tp"])


def summary(results: dict) -> str:
    """One line per tp: split out of the types that build tiny, with percentages."""
    lines = []
    for tp in results["tps"]:
        c = counts(results, tp)
        built = sum(c.values()) - c["cannot_build"]
        pct = 100.0 * c["split"] / built if built else 0.0
        rest = ", ".join(f"{n} {LABELS[v]}" for v, n in sorted(c.items())
                         if v not in ("split", "cannot_build") and n)
        lines.append(f"tp {tp}: {c['split']} / {built} correct+split ({pct:.0f}%) of the types "
                     f"that build tiny{'; ' + rest if rest else ''}; "
                     f"{c['cannot_build']} cannot build tiny")
    return "\n".join(lines)


def wrong(results: dict) -> list[str]:
    """``type@tp`` of every wrong result."""
    return [f"{name}@{tp}" for name, t in sorted(results["types"].items())
            for tp, e in sorted(t["tp"].items()) if e["verdict"] == "wrong"]


def failures(results: dict, limit: int = 160) -> list[str]:
    """One markdown line per type that is not ``split`` at every tp size (types that build at
    no tp size left out), with its reasons cut to ``limit`` characters."""
    out = []
    for name, t in sorted(results["types"].items()):
        bad = {tp: e for tp, e in t["tp"].items() if e["verdict"] != "split"}
        if bad and not all(e["verdict"] == "cannot_build" for e in t["tp"].values()):
            cells = "; ".join(f"tp {tp}: {describe(e, limit)}" for tp, e in sorted(bad.items()))
            out.append(f"- `{name}` ({t['kind']}): {cells}")
    return out


def table(results: dict) -> str:
    """The markdown table: one row per model type, one column per tp size."""
    tps = results["tps"]
    head = "| model_type | kind | " + " | ".join(f"tp {tp}" for tp in tps) + " |"
    lines = [head, "|" + "---|" * (2 + len(tps))]
    for name, t in sorted(results["types"].items()):
        cells = [describe(t["tp"][str(tp)]) if str(tp) in t["tp"] else "-" for tp in tps]
        lines.append(f"| {name} | {t['kind']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """Summary, versions and the table, as README's generated section shows them."""
    head = (f"transformers {results['transformers']}, torch {results['torch']}, "
            f"{results['date']}; bound for \"split\": the rank holding most holds at most "
            + ", ".join(f"{split_bound(tp):.2f} (tp {tp})" for tp in results["tps"])
            + " of the parameter bytes")
    body = "\n".join(f"* {line}" for line in summary(results).splitlines())
    return f"{head}\n\n{body}\n\n{table(results)}"
