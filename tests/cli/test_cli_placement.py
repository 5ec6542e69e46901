"""Placement in the CLI: ``--tp auto`` and its reason, the tp hint, ``xtp env``'s placement and
(under torchrun) its TP groups, ``xtp plan --world/--nodes``, and the typed errors for bad
``--tp`` values. Topologies other than this machine's come from fake sysfs trees."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from fake_sysfs import fake_sysfs
from xtp.accelerators.cpu import cpu_topology
from xtp.accelerators.cpu.cpu_topology import parse_cpulist, read_topology
from xtp.cli import placement as cli_placement
from xtp.cli.main import main
from xtp.errors import ArgumentError, DistributedSetupError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("XTP_NUM_THREADS", "XTP_PIN", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def two_sockets(tmp_path, monkeypatch):
    """This process sees a 2-socket host, 2 NUMA nodes per socket, 4 cores per node, SMT."""
    root = fake_sysfs(tmp_path, 2, 2, 4, smt=True)
    fake = read_topology(root, allowed=range(32))
    monkeypatch.setattr(cpu_topology, "read_topology", lambda *a, **k: fake)
    monkeypatch.setattr(cli_placement, "read_topology", lambda *a, **k: fake)
    return fake


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_env_shows_placement_on_a_two_socket_host(two_sockets, capsys):
    rc, out, _ = run_main(capsys, "env", "--tp", "2")
    assert rc == 0
    assert "cpu: 2 sockets, 4 NUMA nodes, 16 physical cores (32 logical CPUs)" in out
    assert "tp auto: 4 (2 sockets, 4 NUMA nodes" in out
    assert ("placement of 2 local ranks (XTP_PIN unset: xtp run/bench pin the ranks they start,"
            " torchrun ranks are left alone): 2 ranks x 8 physical cores") in out
    assert "  rank 0: CPUs 0-7 (8 threads, socket 0, NUMA node 0,1)" in out
    assert "  rank 1: CPUs 8-15 (8 threads, socket 1, NUMA node 2,3)" in out
    rc, out, _ = run_main(capsys, "env", "--json")
    cpu = json.loads(out)["cpu"]
    assert cpu["tp_auto"] == 4 and cpu["local_ranks"] == 4
    assert [r["cpus"] for r in cpu["placement"]["ranks"]] == ["0-3", "4-7", "8-11", "12-15"]


def test_env_shows_a_bad_xtp_pin_instead_of_failing(capsys, monkeypatch):
    monkeypatch.setenv("XTP_PIN", "maybe")
    rc, out, _ = run_main(capsys, "env")
    assert rc == 0
    assert "placement: unknown -- XTP_PIN='maybe' is not understood; use 1" in out


def test_tp_auto_one_socket_says_why(tmp_path, monkeypatch):
    topo = read_topology(fake_sysfs(tmp_path, 1, 1, 16, smt=True), allowed=range(32))
    tp, why = cli_placement.resolve_tp("auto", "tiny-llama", topo)
    assert tp == 1
    assert why == ("tp auto: 1 (1 socket, 1 NUMA node, 16 physical cores (32 logical CPUs): one "
                   "memory domain, so one process on all 16 cores already reads at its "
                   "bandwidth; tp > 1 would share that bandwidth and add two all-reduces per "
                   "transformer block)")
    assert cli_placement.hint(2, topo).startswith("hint: this host is one memory domain")
    assert cli_placement.resolve_tp(3, "tiny-llama", topo) == (3, None)


def test_tp_auto_falls_back_to_a_size_the_model_takes(tmp_path):
    topo = read_topology(fake_sysfs(tmp_path, 2, 2, 4, smt=False), allowed=range(16))
    assert cli_placement.resolve_tp("auto", "tiny-llama", topo)[0] == 4
    many = read_topology(fake_sysfs(tmp_path / "13", 1, 13, 1, smt=False), allowed=range(13))
    tp, why = cli_placement.resolve_tp("auto", "tiny-llama", many)
    assert tp == 1 and why.endswith("tiny-llama cannot take tp 13, so tp 1")


def test_tp_auto_refused_off_the_cpu(monkeypatch):
    monkeypatch.setattr(cli_placement, "_on_cpu", lambda: False)
    with pytest.raises(ArgumentError, match="--tp auto chooses from the host CPU's topology"):
        cli_placement.resolve_tp("auto", "tiny-llama")


@pytest.mark.parametrize("argv, message", [
    (("run", "--tp", "two"), "argument --tp: invalid int value: 'two' (give a tensor-parallel "
     "size such as 2, or auto)"),
    (("run", "--tp", "-2"), "--tp must be >= 1, got -2"),
    (("env", "--tp", "0"), "--tp must be >= 1, got 0"),
    (("bench", "tiny-llama", "--tp", "auto,x"), "--tp takes comma-separated integers (or auto)"),
    (("plan", "tiny-llama", "--tp", "2", "--world", "6", "--nodes", "4"),
     "--world 6 ranks cannot be spread evenly over --nodes 4"),
    (("plan", "tiny-llama", "--tp", "4", "--world", "6"), "choose --tp from [1, 2, 3, 6]"),
    (("plan", "tiny-llama", "--tp", "4", "--world", "8", "--nodes", "4"),
     "tp_size=4 would make a TP group span nodes"),
])
def test_bad_tp_values_are_one_line_exit_2(capsys, argv, message):
    rc, out, err = run_main(capsys, *argv)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_plan_names_the_tp_groups_of_a_world(capsys):
    rc, out, _ = run_main(capsys, "plan", "tiny-llama", "--tp", "2", "--world", "4", "--nodes",
                          "2")
    assert rc == 0
    assert out.endswith("4 ranks on 2 node(s), tp 2 x dp 2:\ntp group 0: ranks 0, 1 on node0\n"
                        "tp group 1: ranks 2, 3 on node1\n")


def test_torchrun_ranks_are_not_pinned_unless_asked(monkeypatch):
    from xtp.accelerators import create
    from xtp.accelerators.cpu.placement import place_rank_if_asked

    before = os.sched_getaffinity(0)
    assert place_rank_if_asked(create("cpu"), 0, 2) is None
    assert os.sched_getaffinity(0) == before


def test_init_distributed_bad_xtp_pin_is_a_setup_error(monkeypatch):
    import xtp

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("XTP_PIN", "always")
    with pytest.raises(DistributedSetupError, match="XTP_PIN='always' is not understood"):
        xtp.init_distributed(1, accelerator="cpu")


@pytest.mark.distributed
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_env_under_torchrun_names_tp_groups_hosts_and_pinned_cpus():
    env = dict(os.environ, XTP_PIN="1")
    for name in ("XTP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "xtp.cli.main", "env", "--tp", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    # KNOWN: on a loaded machine, a rank now and then aborts at interpreter exit, after its work
    # ("terminate called without an active exception", SIGABRT) inside torch's gloo/store
    # teardown; reproduced with xtp's pinning off and both ranks under `taskset -c 0`
    # (2 of 8 runs), so it is not xtp's placement. Only that exit is tolerated, and only once
    # the output is complete; any other failure fails the test.
    torch_exit_abort = (proc.returncode == 1 and "exitcode  : -6" in proc.stderr
                        and "terminate called without an active exception" in proc.stderr)
    assert proc.returncode == 0 or torch_exit_abort, proc.stdout + proc.stderr
    out = proc.stdout
    host = socket.gethostname()
    assert f"tp group 0: ranks 0, 1 on {host}" in out
    assert "this is global rank 0 of 2: tp rank 0 of 2, dp rank 0 of 1" in out
    cpus = [line.split("CPUs ")[1].rsplit(", ", 1)[0] for line in out.splitlines()
            if line.startswith("  global rank ")]
    assert len(cpus) == 2
    assert set(parse_cpulist(cpus[0])).isdisjoint(parse_cpulist(cpus[1]))
