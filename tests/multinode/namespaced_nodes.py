"""Two "nodes" on one machine: each its own torchrun agent in its own Linux namespaces.

Each node runs ``unshare --ipc --mount --uts --pid --mount-proc --kill-child`` with its own
hostname (``xtp-node-<i>``), its own tmpfs on ``/dev/shm`` and its own pid namespace, so xtp's
host detection (hostname + boot id, pid namespace) and the shared-memory all-reduce see two
hosts for real; the network stays the host's loopback (the c10d rendezvous and gloo run over
it), each node with its own address ``127.0.0.<i+1>`` (torchrun names a node by address and
agent pid, and every agent is pid 1 of its namespace). Folders in ``hide[i]`` are covered by
an empty tmpfs on node ``i``: that node cannot see them (a checkpoint copy or a save folder
local to the other node).

Node 0 hosts the rendezvous store (``is_host=1``); killing node 1 (:meth:`Nodes.kill`: SIGKILL
to its ``unshare``, whose ``--kill-child`` takes the namespace's init and so every process
of the node with it) leaves the store to the survivors.
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
WORKER = HELPERS / "multinode_worker.py"
UNSHARE = ["unshare", "--ipc", "--mount", "--uts", "--pid", "--mount-proc", "--kill-child"]


@functools.lru_cache(maxsize=1)
def namespaces_unavailable() -> str | None:
    """Why this machine cannot run namespaced nodes (``None``: it can); probed once."""
    script = "hostname xtp-probe && mount -t tmpfs tmpfs /dev/shm && test $(hostname) = xtp-probe"
    try:
        res = subprocess.run([*UNSHARE, "sh", "-c", script], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run unshare: {exc}"
    if res.returncode:
        return (f"`{' '.join(UNSHARE)}` is not permitted here (needs root or user namespaces): "
                f"{res.stderr.strip() or res.returncode}")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nodes:
    """``nnodes`` namespaced torchrun agents of ``nproc`` ranks each, running
    ``multinode_worker.py scenario out_dir``; ``env[i]`` adds node ``i``'s variables."""

    def __init__(self, scenario: str, out_dir: Path, *, nnodes: int = 2, nproc: int = 2,
                 env: Sequence[Mapping[str, str]] = (), hide: Sequence[Sequence[Path]] = (),
                 timeout_s: float = 4.0) -> None:
        self.out_dir = Path(out_dir)
        self.logs = [self.out_dir / f"{scenario}-node{i}.log" for i in range(nnodes)]
        port = _free_port()
        self.procs: list[subprocess.Popen] = []
        for i in range(nnodes):
            covered = hide[i] if i < len(hide) else ()
            mounts = "".join(f" && mount -t tmpfs tmpfs {shlex.quote(str(p))}" for p in covered)
            agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
                     "--node-rank", str(i), "--nproc-per-node", str(nproc),
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                     "--rdzv-conf", f"is_host={int(i == 0)},join_timeout=60",
                     "--local-addr", f"127.0.0.{i + 1}", "--max-restarts", "0",
                     str(WORKER), scenario, str(self.out_dir)]
            script = (f"hostname xtp-node-{i} && mount -t tmpfs tmpfs /dev/shm{mounts} && "
                      f"exec {shlex.join(agent)}")
            node_env = {**os.environ, "OMP_NUM_THREADS": "1", "XTP_TIMEOUT": str(timeout_s),
                        "GLOO_SOCKET_IFNAME": "lo",
                        "PYTHONPATH": os.pathsep.join(
                            [str(HELPERS), os.environ.get("PYTHONPATH", "")]),
                        **(env[i] if i < len(env) else {})}
            with open(self.logs[i], "wb") as log:
                self.procs.append(subprocess.Popen(
                    [*UNSHARE, "sh", "-c", script], stdout=log, stderr=subprocess.STDOUT,
                    env=node_env, cwd=str(HELPERS.parent.parent), start_new_session=True))

    def wait(self, timeout: float) -> list[int]:
        """Every node's exit code; nodes still running after ``timeout`` s are killed (-9)."""
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        return codes

    def wait_for(self, paths: Sequence[Path], timeout: float) -> bool:
        """Poll until every file in ``paths`` exists (True) or a node exited or ``timeout`` s
        passed (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.exists() for p in paths):
                return True
            if any(p.poll() is not None for p in self.procs):
                return all(p.exists() for p in paths)
            time.sleep(0.05)
        return False

    def kill(self, node: int) -> float:
        """SIGKILL node ``node`` (its whole namespace); returns the time it was sent."""
        t = time.time()
        os.kill(self.procs[node].pid, signal.SIGKILL)
        return t

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def output(self) -> str:
        """Every node's log, for failure messages."""
        return "\n".join(f"--- node {i} ---\n{log.read_text(errors='replace')[-6000:]}"
                         for i, log in enumerate(self.logs) if log.exists())
