"""The CLI as a user drives it: subprocesses, real ranks on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xtp.accelerators.cpu.cpu_topology import parse_cpulist


def xtp(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xtp.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.distributed
def test_run_default_model_two_ranks_matches_unsharded():
    proc = xtp("run", "--tp", "2", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "model tiny-llama  tp 2" in out
    assert "rank 0: ready in" in out and "rank 1: ready in" in out
    assert "matches unsharded model: yes" in out
    assert "tokens/s" in out
    # each rank pinned to its own cores (xtp run's placement): the two CPU lists are disjoint
    cpus = [line.split("CPUs ")[1].split(" (")[0] for line in out.splitlines()
            if line.startswith("rank ") and "CPUs " in line]
    assert len(cpus) == 2
    assert set(parse_cpulist(cpus[0])).isdisjoint(parse_cpulist(cpus[1]))


def test_run_tp1_single_process():
    proc = xtp("run", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert "matches unsharded model: yes" in proc.stdout


def test_plan_json_from_config_alone():
    proc = xtp("plan", "llama-1b", "--tp", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["tp_size"] == 2
    assert data["collectives_per_forward"] == {"all_reduce": 33, "all_gather": 1}
    roles = {m["name"]: m["role"] for m in data["modules"]}
    assert roles["model.layers.0.self_attn.o_proj"] == "row"


def test_plan_table():
    proc = xtp("plan", "tiny-llama", "--tp", "4")
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.*.self_attn.q_proj" in proc.stdout
    assert "collectives per forward: 1 x all_gather, 9 x all_reduce" in proc.stdout


def test_user_error_is_one_line_without_traceback():
    proc = xtp("plan", "no-such-model", "--tp", "2")
    assert proc.returncode == 2
    assert proc.stderr.startswith("xtp plan: error: MODEL 'no-such-model' is neither a built-in")
    assert "Traceback" not in proc.stderr


def test_tp_that_heads_cannot_take_names_working_sizes():
    proc = xtp("plan", "tiny-llama", "--tp", "13")
    assert proc.returncode == 2
    assert "Sizes that work" in proc.stderr and "Traceback" not in proc.stderr
