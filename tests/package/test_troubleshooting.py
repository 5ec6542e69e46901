"""README's Troubleshooting table against the code: it names every typed error a user can meet
(every ``XtpError`` subclass in xtp, ``xtp.accelerators`` included), each class it names
exists, and each is named by a test that raises or asserts it."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import xtp
from xtp.errors import XtpError

ROOT = Path(__file__).resolve().parents[2]


def table_classes() -> dict[str, str]:
    """{error class named in a row: that row's symptom}."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Troubleshooting\n", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    named: dict[str, str] = {}
    for row in rows:
        symptom, seen = row.split("|")[1:3]
        for name in re.findall(r"`(?:[^`]*?: )?([A-Z]\w*Error)\b", seen):
            named.setdefault(name, symptom.strip())
    return named


def error_classes() -> dict[str, type]:
    """Every XtpError subclass defined anywhere in the installed package."""
    for mod in pkgutil.walk_packages(xtp.__path__, "xtp."):
        importlib.import_module(mod.name)
    found: dict[str, type] = {}
    todo = [XtpError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("xtp.") and sub.__name__ not in found:
                found[sub.__name__] = sub
                todo.append(sub)
    return found


def test_table_names_every_error_class():
    missing = sorted(set(error_classes()) - set(table_classes()))
    assert not missing, f"README's Troubleshooting table does not name {missing}"


def test_every_class_in_the_table_exists():
    classes = error_classes()
    unknown = sorted(set(table_classes()) - set(classes))
    assert not unknown, f"the table names classes xtp does not have: {unknown}"


def test_every_row_has_a_test_behind_it():
    files = [*(ROOT / "tests").rglob("test_*.py"), *(ROOT / "tests" / "helpers").glob("*.py")]
    sources = "\n".join(p.read_text() for p in files  # helpers: the workers real ranks run
                        if p.name != Path(__file__).name)
    untested = sorted(n for n in table_classes()
                      if not re.search(rf"\b{n}\b", sources))
    assert not untested, f"no test names {untested}"
