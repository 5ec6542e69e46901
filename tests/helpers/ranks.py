"""Real multi-process ranks for tests: one-shot spawns and a reusable pool.

* :func:`spawn` starts ``world_size`` fresh processes with torchrun-style environment
  variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and runs
  ``fn(*args)`` in each; it returns the per-rank results or raises :class:`RankFailure`
  with every failing rank's traceback. Use it when the test exercises process-group setup.
* :class:`RankPool` keeps ``world_size`` processes with an initialised gloo world alive for
  the whole session and runs many tasks on them (parity tests: saves ~3 s of imports per
  test). A task must leave no global state behind.

``fn`` must be importable by name (a module-level function), as with any spawn-based pool.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_TIMEOUT = 240.0


class RankFailure(AssertionError):
    """One or more ranks raised; the message holds each failing rank's traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int, extra: dict[str, str] | None) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    os.environ.update(extra or {})


def _one_shot(rank, world, port, env, fn, args, out):
    _rank_env(rank, world, port, env)
    import torch

    torch.set_num_threads(1)
    try:
        out.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    env: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh ranks; return results ordered by rank."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_one_shot, args=(r, world_size, port, env, fn, tuple(args), out))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[bool, Any]] = {}
    try:
        for _ in range(world_size):
            rank, ok, value = out.get(timeout=timeout)
            results[rank] = (ok, value)
    except Exception:  # queue.Empty: some rank hung or died silently
        pass
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    _raise_failures(results, world_size)
    return [results[r][1] for r in range(world_size)]


def _raise_failures(results: dict[int, tuple[bool, Any]], world_size: int) -> None:
    missing = [r for r in range(world_size) if r not in results]
    failed = {r: v for r, (ok, v) in results.items() if not ok}
    if missing or failed:
        parts = [f"ranks with no result (hung or died): {missing}"] if missing else []
        parts += [f"--- rank {r} ---\n{tb}" for r, tb in sorted(failed.items())]
        raise RankFailure("\n".join(parts))


def _pool_worker(rank, world, port, tasks, out):
    _rank_env(rank, world, port, None)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            out.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001
            out.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """``world_size`` long-lived ranks with an initialised gloo world."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self._out = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self._procs = [
            ctx.Process(target=_pool_worker, args=(r, world_size, port, self._tasks[r], self._out),
                        daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._broken = False

    def run(
        self, fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT
    ) -> list[Any]:
        """Run ``fn(*args)`` on every rank; results ordered by rank."""
        if self._broken:
            raise RankFailure("this rank pool broke in an earlier test")
        for q in self._tasks:
            q.put((fn, args))
        results: dict[int, tuple[bool, Any]] = {}
        try:
            for _ in range(self.world_size):
                rank, ok, value = self._out.get(timeout=timeout)
                results[rank] = (ok, value)
        except Exception:
            self._broken = True
        if len(results) < self.world_size:
            self._broken = True
        _raise_failures(results, self.world_size)
        return [results[r][1] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
