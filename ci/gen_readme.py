"""Regenerate README.md's generated sections from the code (run: python ci/gen_readme.py).

* the supported-architectures table, from the parity test matrix (tests/helpers/parity_cases.py);
* the example ``print(xtp.plan(...))`` output;
* the coverage sweep's summary and table, from the committed results of ``xtp coverage``
  (``bench/coverage-transformers5.json``; the sweep itself takes minutes, so it is not re-run
  here: the ``coverage`` test tier checks that file against the code).

``--check`` exits non-zero when README.md is out of date (used by tests/package/test_readme.py).
"""

from __future__ import annotations

import io
import re
import sys
from collections import defaultdict
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))


def arch_table() -> str:
    from parity_cases import CASES

    by_type: dict[str, list] = defaultdict(list)
    for case in CASES:
        by_type[case.model_type].append(case)
    lines = ["| model_type | parity cases (tp sizes) | checked |", "|---|---|---|"]
    for model_type in sorted(by_type):
        cases = ", ".join(f"`{c.id}` ({'/'.join(map(str, c.tps))})" for c in by_type[model_type])
        kind = {"causal": "logits + 16 greedy tokens", "encoder": "last hidden state",
                "seq2seq": "logits + 16 greedy tokens"}[by_type[model_type][0].kind]
        lines.append(f"| {model_type} | {cases} | {kind} |")
    return "\n".join(lines)


def plan_example() -> str:
    import xtp
    from xtp.models.builtin import resolve_config

    buf = io.StringIO()
    with redirect_stdout(buf):
        print(xtp.plan(resolve_config("tiny-llama"), tp_size=4))
    head = ">>> print(xtp.plan(config, tp_size=4))   # tiny-llama\n"
    return "```text\n" + head + buf.getvalue() + "```"


COVERAGE_FILE = ROOT / "bench" / "coverage-transformers5.json"


def coverage_section() -> str:
    import json

    from xtp.bench.coverage_report import markdown

    return markdown(json.loads(COVERAGE_FILE.read_text()))


SECTIONS = {"archs": arch_table, "plan-example": plan_example, "coverage": coverage_section}


def render(text: str) -> str:
    for name, fn in SECTIONS.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)
        text = pattern.sub(lambda m, fn=fn: m.group(1) + fn() + "\n" + m.group(2), text)
    return text


def main() -> int:
    path = ROOT / "README.md"
    old = path.read_text()
    new = render(old)
    if "--check" in sys.argv:
        if new != old:
            print("README.md is out of date: run python ci/gen_readme.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
