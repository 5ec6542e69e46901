"""The placement rules of xtp.distributed.topology, on recorded host identities (no namespaces:
these run in the default suite; tests/multinode/test_multinode.py proves them on two real
namespaced nodes)."""

from __future__ import annotations

import time
import warnings

import pytest

from multinode_worker import one_node_topology
from xtp.accelerators.comm import failures
from xtp.accelerators.comm.failures import Peer
from xtp.accelerators.env import cross_node_tp
from xtp.accelerators.errors import EnvSettingError
from xtp.distributed.topology import CrossNodeTPWarning, Topology, check_placement
from xtp.errors import DistributedSetupError, TPSizeError


def _peers(hosts: list[str], boots: list[str] | None = None) -> dict[int, Peer]:
    boots = boots or ["boot"] * len(hosts)
    return {r: Peer(r, h, f"{b}/pid:[1]", 100 + r) for r, (h, b) in enumerate(zip(hosts, boots))}


def _topo(hosts: list[str], tp: int, boots: list[str] | None = None) -> Topology:
    n = len(hosts)
    return Topology.build(n, [range(k, k + tp) for k in range(0, n, tp)], _peers(hosts, boots))


def test_topology_groups_ranks_by_host_and_describes_each_tp_group():
    topo = _topo(["a", "a", "b", "b"], 2)
    assert topo.nodes == (0, 0, 1, 1) and topo.num_nodes == 2 and topo.ranks_per_node() == 2
    assert topo.spanning() == []
    assert topo.as_dict() == {
        "tp_groups": [{"ranks": [0, 1], "hosts": ["a"]}, {"ranks": [2, 3], "hosts": ["b"]}],
        "nodes": {"a": [0, 1], "b": [2, 3]}}
    assert topo.describe() == "tp group 0: ranks 0, 1 on a\ntp group 1: ranks 2, 3 on b"
    check_placement(topo, 2, allow_cross_node=False)  # allowed: nothing raised, no warning


def test_one_hostname_with_two_boot_ids_is_two_nodes():
    topo = _topo(["x", "x", "x", "x"], 4, boots=["b1", "b1", "b2", "b2"])
    assert topo.nodes == (0, 0, 1, 1) and topo.spanning() == [(0, 1, 2, 3)]


def test_tp_that_does_not_divide_the_ranks_per_node_lists_the_divisors():
    topo = _topo(["a"] * 4 + ["b"] * 4 + ["c"] * 4, 3)  # 3 divides the world, not a node
    with pytest.raises(TPSizeError) as info:
        check_placement(topo, 3, allow_cross_node=False)
    msg = str(info.value)
    assert "tp_size=3 would make a TP group span nodes (ranks 3 on a; ranks 4, 5 on b)" in msg
    assert "each of the 3 nodes runs 4 ranks, so choose tp_size from [1, 2, 4]" in msg
    assert "allow_cross_node_tp=True" in msg and "XTP_CROSS_NODE_TP=1" in msg


def test_cross_node_tp_when_asked_is_a_warning_naming_the_cost():
    topo = _topo(["a", "a", "b", "b"], 4)
    with pytest.warns(CrossNodeTPWarning, match="span nodes .* over the network"):
        check_placement(topo, 4, allow_cross_node=True)


def test_ranks_not_numbered_node_by_node_are_refused_with_where_each_rank_runs():
    topo = _topo(["a", "b", "a", "b"], 2)
    with pytest.raises(DistributedSetupError) as info:
        check_placement(topo, 2, allow_cross_node=False)
    msg = str(info.value)
    assert "TP group of global ranks [0, 1] would span nodes (ranks 0 on a; ranks 1 on b)" in msg
    assert "not numbered node by node (a: ranks 0, 2; b: ranks 1, 3)" in msg
    assert "--nproc-per-node" in msg


def test_nodes_with_different_rank_counts_are_refused_when_a_group_spans_them():
    topo = _topo(["a", "a", "a", "b"], 2)
    with pytest.raises(DistributedSetupError, match="the nodes run different numbers of ranks"):
        check_placement(topo, 2, allow_cross_node=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_placement(_topo(["a", "a", "b", "b", "b", "b"], 2), 2, allow_cross_node=False)


def test_cross_node_env_variable_is_parsed_strictly(monkeypatch):
    for value, want in (("", False), ("0", False), ("no", False), ("1", True), ("ON", True)):
        monkeypatch.setenv("XTP_CROSS_NODE_TP", value)
        assert cross_node_tp() is want
    monkeypatch.setenv("XTP_CROSS_NODE_TP", "maybe")
    with pytest.raises(EnvSettingError, match="XTP_CROSS_NODE_TP='maybe' is not understood"):
        cross_node_tp()


def test_init_distributed_turns_a_bad_env_value_into_a_setup_error(monkeypatch):
    import xtp

    monkeypatch.setenv("XTP_CROSS_NODE_TP", "maybe")
    with pytest.raises(DistributedSetupError, match="XTP_CROSS_NODE_TP"):
        xtp.init_distributed()


def test_single_process_context_describes_its_one_group(monkeypatch):
    import socket

    import xtp

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    host = socket.gethostname()
    ctx = xtp.init_distributed()
    assert ctx.topology.as_dict() == {"tp_groups": [{"ranks": [0], "hosts": [host]}],
                                      "nodes": {host: [0]}}
    assert ctx.describe().splitlines()[-1] == (
        "this is global rank 0 of 1: tp rank 0 of 1, dp rank 0 of 1")


def test_a_silent_rank_on_another_host_is_named_with_all_ranks_of_that_host(monkeypatch):
    me = failures.this_peer()
    monkeypatch.setattr(failures, "_peers", {
        0: Peer(0, me.host, me.machine, me.pid), 1: Peer(1, me.host, me.machine, me.pid + 1),
        2: Peer(2, "node-b", "other-boot/ns", 7), 3: Peer(3, "node-b", "other-boot/ns", 8)})
    assert failures._remote_hosts([2]) == " (host node-b runs global ranks 2, 3)"
    assert failures._remote_hosts([1]) == ""
    start = time.monotonic()
    assert failures.gone_ranks([2, 3], wait_s=5.0) == []  # other host: answered at once
    assert time.monotonic() - start < 1.0


@pytest.mark.distributed
def test_every_rank_of_one_host_gets_the_same_topology(rank_pool):
    import socket

    host = socket.gethostname()
    results = rank_pool(4).run(one_node_topology, 2)
    for topo, text in results:
        assert topo == {"tp_groups": [{"ranks": [0, 1], "hosts": [host]},
                                      {"ranks": [2, 3], "hosts": [host]}],
                        "nodes": {host: [0, 1, 2, 3]}}
        assert text.splitlines()[:2] == [f"tp group 0: ranks 0, 1 on {host}",
                                         f"tp group 1: ranks 2, 3 on {host}"]
