"""``xtp run --tp 2`` when a rank fails: a non-zero exit and one line saying which rank and why,
no traceback. The ranks are real processes started by torch's elastic launcher; one is killed
from here by pid, or every rank raises on a config that cannot be sharded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from reliability_worker import TINY

pytestmark = pytest.mark.distributed


def _start(*args: str, timeout: str = "5") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "xtp.cli.main", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "XTP_TIMEOUT": timeout, "XTP_ACCELERATOR": "cpu"})


def _rank_processes(parent: int) -> list[int]:
    """The launcher's worker processes (multiprocessing spawn children of ``parent``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline") as f:
                cmd = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        if ppid == parent and "spawn_main" in cmd and "resource_tracker" not in cmd:
            found.append(int(entry))
    return sorted(found)


def _one_line_error(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("xtp run: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_killed_rank_is_one_line_and_non_zero(tmp_path):
    cfg = tmp_path / "long.json"  # positions for a generation that outlasts the test
    cfg.write_text(json.dumps({"model_type": "llama", **TINY,
                               "max_position_embeddings": 1 << 20}))
    proc = _start("run", str(cfg), "--tp", "2", "--no-check", "--max-new-tokens", "1000000")
    try:
        deadline = time.monotonic() + 90
        while len(_rank_processes(proc.pid)) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        victim = _rank_processes(proc.pid)[-1]
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err
    line = _one_line_error(err)
    assert f"(pid {victim}) was killed by signal SIGKILL" in line, line
    assert "1 of 2 ranks failed: rank " in line
    assert took < 30, f"{took:.1f} s from the kill to the exit"


def test_ranks_raising_is_one_line_and_non_zero(tmp_path):
    cfg = tmp_path / "one_head.json"  # one attention head cannot be split over 2 ranks
    cfg.write_text(json.dumps({"model_type": "llama", **TINY, "num_attention_heads": 1,
                               "num_key_value_heads": 1}))
    # both ranks fail in planning; a generous timeout so that a rank slowed by a loaded machine
    # still reaches the agreement step (a timeout there would be another, correct, error)
    proc = _start("run", str(cfg), "--tp", "2", "--max-new-tokens", "2", timeout="60")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err
    line = _one_line_error(err)
    assert "failed: TPSizeError: tp_size=2 is larger than the number of attention heads" in line
    assert "Sizes that work: [1]" in line
