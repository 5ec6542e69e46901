"""CPU topology reading and rank placement: fake sysfs trees (one socket with SMT, two sockets
x two NUMA nodes, a cpuset-restricted container, no sysfs), the tp auto rule and its hints,
``XTP_PIN`` parsing. Real ranks with disjoint affinity masks: tests/cli/test_cli_placement.py
(torchrun) and tests/cli/test_cli_run.py (xtp run --tp 2)."""

from __future__ import annotations

import pytest

from fake_sysfs import fake_sysfs
from xtp.accelerators.cpu.cpu_topology import format_cpulist, parse_cpulist, read_topology
from xtp.accelerators.cpu.placement import choose_tp, plan_placement, tp_hint
from xtp.accelerators.env import pin_mode
from xtp.accelerators.errors import EnvSettingError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("XTP_NUM_THREADS", "XTP_PIN"):
        monkeypatch.delenv(name, raising=False)


def test_cpulist_round_trip():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("") == []
    assert format_cpulist([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"


def test_one_socket_16_cores_with_smt(tmp_path):
    topo = read_topology(fake_sysfs(tmp_path, 1, 1, 16, smt=True), allowed=range(32))
    assert topo.describe() == "1 socket, 1 NUMA node, 16 physical cores (32 logical CPUs)"
    assert topo.cores[3].cpus == (3, 19)
    one = plan_placement(topo, 1)
    assert one.ranks[0].cpus == tuple(range(16)) and one.threads == 16  # no SMT sibling used
    four = plan_placement(topo, 4)
    assert [r.cpus for r in four.ranks] == [tuple(range(i, i + 4)) for i in range(0, 16, 4)]
    assert four.threads == 4
    assert four.note == "4 ranks x 4 physical cores, one thread per core, 4 ranks per NUMA node"
    smt = plan_placement(topo, 2, smt=True)
    assert sorted(smt.ranks[1].cpus) == list(range(8, 16)) + list(range(24, 32))
    assert smt.threads == 16
    three = plan_placement(topo, 3)  # 5 cores each, one idle
    assert [r.cpus for r in three.ranks] == [tuple(range(i, i + 5)) for i in (0, 5, 10)]
    assert three.note.endswith("1 core(s) left idle")


def test_two_sockets_two_numa_nodes_each(tmp_path):
    topo = read_topology(fake_sysfs(tmp_path, 2, 2, 4, smt=True), allowed=range(32))
    assert topo.describe() == "2 sockets, 4 NUMA nodes, 16 physical cores (32 logical CPUs)"
    assert [(s, n) for s, n, _ in topo.domains()] == [(0, 0), (0, 1), (1, 2), (1, 3)]
    two = plan_placement(topo, 2)  # one rank per socket, holding both of its nodes
    assert [(r.sockets, r.nodes, r.cpus) for r in two.ranks] == [
        ((0,), (0, 1), tuple(range(8))), ((1,), (2, 3), tuple(range(8, 16)))]
    assert "each rank on 2 NUMA nodes of one socket" in two.note
    eight = plan_placement(topo, 8)  # two ranks per node, never across one
    assert all(len(r.nodes) == 1 for r in eight.ranks)
    assert [r.nodes[0] for r in eight.ranks] == [0, 0, 1, 1, 2, 2, 3, 3]
    three = plan_placement(topo, 3)  # does not divide: in order, and the note says so
    assert [len(r.cpus) for r in three.ranks] == [5, 5, 5] and "cross NUMA nodes" in three.note
    assert choose_tp(topo)[0] == 4
    assert "one rank per NUMA node" in choose_tp(topo)[1]
    assert tp_hint(topo, 4) is None and tp_hint(topo, 2) is None
    assert "--tp 4" in tp_hint(topo, 3)


def test_cpuset_restricted_container(tmp_path):
    """A container given CPUs 5-9 and 13 of a 2-socket host (4 cores per socket, SMT: CPUs
    8-15 are the siblings of 0-7): it sees two cores of socket 0 (through their siblings 8, 9)
    and three of socket 1, a sibling pair only where both are allowed."""
    root = fake_sysfs(tmp_path, 2, 1, 4, smt=True)
    topo = read_topology(root, allowed=[5, 6, 7, 8, 9, 13])
    assert [c.cpus for c in topo.cores] == [(8,), (9,), (5, 13), (6,), (7,)]
    assert [c.socket for c in topo.cores] == [0, 0, 1, 1, 1]
    two = plan_placement(topo, 2)  # one rank per socket, equal cores, one left idle
    assert [(r.cpus, r.sockets) for r in two.ranks] == [((8, 9), (0,)), ((5, 6), (1,))]
    assert two.note.endswith("one rank per NUMA node; 1 core(s) left idle")


def test_missing_sysfs_falls_back_to_logical_cpus(tmp_path):
    topo = read_topology(tmp_path, allowed=[0, 1, 2])
    assert len(topo.cores) == 3 and topo.sockets == (0,)
    assert "no sysfs topology for CPU 0" in topo.describe()
    assert choose_tp(topo)[0] == 1


def test_more_ranks_than_cores_are_not_pinned(tmp_path):
    topo = read_topology(fake_sysfs(tmp_path, 1, 1, 2, smt=False), allowed=[0, 1])
    p = plan_placement(topo, 4)
    assert not p.pinned and p.ranks == () and p.threads == 1
    assert p.note == "not pinned: 4 ranks > 2 physical cores; 1 thread each"


def test_tp_auto_and_hint_on_one_socket(tmp_path):
    topo = read_topology(fake_sysfs(tmp_path, 1, 1, 16, smt=True), allowed=range(32))
    tp, why = choose_tp(topo)
    assert tp == 1
    assert why.startswith("tp auto: 1 (1 socket, 1 NUMA node, 16 physical cores")
    assert "\n" not in why
    assert tp_hint(topo, 1) is None
    assert tp_hint(topo, 2).startswith("hint: this host is one memory domain")


def test_xtp_num_threads_overrides_the_thread_count(tmp_path, monkeypatch):
    topo = read_topology(fake_sysfs(tmp_path, 1, 1, 8, smt=False), allowed=range(8))
    monkeypatch.setenv("XTP_NUM_THREADS", "2")
    assert plan_placement(topo, 2).threads == 2


@pytest.mark.parametrize("raw, mode", [("", "auto"), ("1", "on"), ("YES", "on"), ("smt", "smt"),
                                       ("0", "off"), ("off", "off")])
def test_pin_mode(monkeypatch, raw, mode):
    monkeypatch.setenv("XTP_PIN", raw)
    assert pin_mode() == mode


def test_pin_mode_bad_value(monkeypatch):
    monkeypatch.setenv("XTP_PIN", "sometimes")
    with pytest.raises(EnvSettingError, match="XTP_PIN='sometimes' is not understood; use 1"):
        pin_mode()
