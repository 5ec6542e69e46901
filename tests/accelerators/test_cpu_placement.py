"""CPU topology reading and rank placement: fake sysfs trees (one socket with SMT, two sockets
x two NUMA nodes, a cpuset-restricted container, no sysfs), the tp auto rule and its hints,
``XTP_PIN`` parsing, and one real check that two pinned ranks get disjoint affinity masks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xtp.accelerators.cpu.cpu_topology import format_cpulist, parse_cpulist, read_topology
from xtp.accelerators.cpu.placement import choose_tp, plan_placement, tp_hint
from xtp.accelerators.env import pin_mode
from xtp.accelerators.errors import EnvSettingError


def fake_sysfs(root: Path, sockets: int, nodes_per_socket: int, cores_per_node: int,
               smt: bool) -> Path:
    """A sysfs tree numbered as Linux does: the first thread of every core is CPU 0..N-1 (socket
    by socket, node by node), the SMT siblings N..2N-1 in the same order."""
    n = sockets * nodes_per_socket * cores_per_node
    cpu_dir, node_dir = root / "sys/devices/system/cpu", root / "sys/devices/system/node"
    node_cpus: dict[int, list[int]] = {}
    for core in range(n):
        node, socket = core // cores_per_node, core // (cores_per_node * nodes_per_socket)
        threads = [core, core + n] if smt else [core]
        for cpu in threads:
            topo = cpu_dir / f"cpu{cpu}" / "topology"
            topo.mkdir(parents=True)
            (topo / "physical_package_id").write_text(f"{socket}\n")
            (topo / "core_id").write_text(f"{core % cores_per_node}\n")
            (topo / "thread_siblings_list").write_text(format_cpulist(threads) + "\n")
            node_cpus.setdefault(node, []).append(cpu)
    for node, cpus in node_cpus.items():
        (node_dir / f"node{node}").mkdir(parents=True)
        (node_dir / f"node{node}" / "cpulist").write_text(format_cpulist(cpus) + "\n")
    return root


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


WORKER = """
import os, sys, torch
from xtp.accelerators.cpu.cpu_topology import CpuTopology, Core
from xtp.accelerators.cpu.placement import place_this_rank
topo = CpuTopology(tuple(Core((c,), 0, 0) for c in sorted(os.sched_getaffinity(0))))
mine = place_this_rank(int(sys.argv[1]), 2, topology=topo)
torch.ones(1 << 16).sum()  # start the intra-op pool after pinning
print(repr((sorted(os.sched_getaffinity(0)), torch.get_num_threads(), mine.cpus)))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux affinity and 2 CPUs")
def test_two_real_ranks_get_disjoint_affinity_masks():
    env = dict(os.environ)
    env.pop("XTP_NUM_THREADS", None)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r)], stdout=subprocess.PIPE,
                              text=True, env=env) for r in range(2)]
    outs = [eval(p.communicate(timeout=120)[0]) for p in procs]
    masks = [set(o[0]) for o in outs]
    assert masks[0] and masks[1] and masks[0].isdisjoint(masks[1])
    for mask, threads, cpus in outs:
        assert set(cpus) == set(mask) and threads == len(mask)
