"""README promises: generated sections are current, and CI runs README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_sections_are_current():
    proc = subprocess.run([sys.executable, "ci/gen_readme.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    test_line = [ln for ln in first_block.splitlines() if "pytest" in ln][0]
    command = test_line.split("&&", 1)[1].split("#")[0].strip()
    assert command in (ROOT / ".ci" / "run").read_text()
