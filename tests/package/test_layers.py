"""The layering check (ci/check_layers.py) passes on the repository and fails on each violation.

Each violation test copies xtp/ and accelerators/ to a temporary folder, breaks one rule there,
and asserts that exactly one new problem line appears (the one naming that break), compared with
the same copy before the break. Nothing here imports torch.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "ci" / "check_layers.py"


def _load_check():
    spec = importlib.util.spec_from_file_location("check_layers", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_layers = _load_check()


@pytest.fixture
def tree(tmp_path):
    """A copy of xtp/ and accelerators/, and the problems the check finds in it unchanged."""
    for folder in ("xtp", "accelerators"):
        shutil.copytree(ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
    return tmp_path, set(check_layers.check(tmp_path))


def _new_problems(tree) -> list[str]:
    root, before = tree
    return [p for p in check_layers.check(root) if p not in before]


def _append(path: Path, line: str) -> int:
    """Append ``line`` to ``path``; returns its line number."""
    text = path.read_text()
    if text and not text.endswith("\n"):
        text += "\n"
    path.write_text(text + line + "\n")
    return len(path.read_text().splitlines())


def test_repository_passes():
    proc = subprocess.run([sys.executable, str(CHECK)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "layers: ok"


def test_upward_import_fails(tree):
    root, _ = tree
    (root / "xtp" / "sharding" / "upstairs.py").write_text('"""A sharding module."""\n')
    line = _append(root / "xtp" / "planning" / "spec.py", "from ..sharding import upstairs")
    assert _new_problems(tree) == [
        "upward import: xtp.planning.spec imports xtp.sharding.upstairs"
        f" (xtp.planning is below xtp.sharding; xtp/planning/spec.py:{line})"
    ]


def test_upward_import_inside_accelerators_fails(tree):
    root, _ = tree
    (root / "accelerators" / "devices" / "upstairs.py").write_text('"""A devices module."""\n')
    line = _append(root / "accelerators" / "comm" / "base.py",
                   "from ..devices.upstairs import __doc__ as _doc")
    assert _new_problems(tree) == [
        "upward import: xtp.accelerators.comm.base imports xtp.accelerators.devices.upstairs"
        " (xtp.accelerators.comm is below xtp.accelerators.devices;"
        f" accelerators/comm/base.py:{line})"
    ]


def test_accelerators_importing_the_core_fails(tree):
    root, _ = tree
    line = _append(root / "accelerators" / "comm" / "base.py", "from xtp.errors import XtpError")
    assert _new_problems(tree) == [
        "core import: xtp.accelerators.comm.base imports xtp.errors"
        f" (accelerators/comm/base.py:{line})"
    ]


def test_circle_in_one_layer_fails(tree):
    root, _ = tree
    (root / "xtp" / "planning" / "circle_a.py").write_text("from . import circle_b\n")
    (root / "xtp" / "planning" / "circle_b.py").write_text(
        "def f():\n    from .circle_a import f as g\n    return g\n"
    )
    assert _new_problems(tree) == [
        "import circle: xtp.planning.circle_a -> xtp.planning.circle_b -> xtp.planning.circle_a"
    ]


def test_importing_the_own_package_face_is_no_circle(tree):
    root, _ = tree
    kit = root / "xtp" / "models" / "kit"
    kit.mkdir()
    (kit / "__init__.py").write_text("from .a import A\nfrom .b import B\n")
    (kit / "a.py").write_text("class A:\n    pass\n")
    (kit / "b.py").write_text("from . import A\n\n\nclass B(A):\n    pass\n")
    assert _new_problems(tree) == []


def test_over_long_file_fails(tree):
    root, _ = tree
    limit = check_layers.LIMIT
    (root / "xtp" / "planning" / "at_limit.py").write_text("x = 0\n" * limit)
    (root / "xtp" / "planning" / "too_long.py").write_text("x = 0\n" * (limit + 1))
    assert _new_problems(tree) == [
        f"file too long: xtp/planning/too_long.py has {limit + 1} lines (limit {limit})"
    ]


@pytest.mark.parametrize("folder, name", [
    ("xtp/newlayer", "xtp.newlayer"),
    ("accelerators/newlayer", "xtp.accelerators.newlayer"),
])
def test_unknown_subpackage_fails(tree, folder, name):
    root, _ = tree
    (root / folder).mkdir()
    (root / folder / "__init__.py").write_text("")
    (root / folder / "thing.py").write_text("from . import __name__ as _n\n")
    assert _new_problems(tree) == [f"unknown layer: {name}: add it to LAYERS in ci/check_layers.py"]


def test_command_line_exits_1_and_counts(tree):
    root, before = tree
    (root / "xtp" / "newlayer.py").write_text("")
    proc = subprocess.run([sys.executable, str(CHECK), str(root)], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert "unknown layer: xtp.newlayer: add it to LAYERS in ci/check_layers.py" in lines
    assert lines[-1] == f"layers: {len(before) + 1} problems"
