"""A fake Linux sysfs CPU tree for topology tests (sockets x NUMA nodes x cores, SMT)."""

from __future__ import annotations

from pathlib import Path

from xtp.accelerators.cpu.cpu_topology import format_cpulist


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
