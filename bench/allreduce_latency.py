"""All-reduce latency by tensor size: gloo vs xtp's shared-memory path, side by side.

Usage (starts its own ranks; or run it under ``torchrun --nproc-per-node N``)::

    python bench/allreduce_latency.py --tp 2 --dtypes float32 bfloat16

For every dtype and size, each round times ``reps`` gloo all-reduces and ``reps`` shared-memory
all-reduces back to back (rotating which goes first), so both see the same machine load.
The table shows the median over all rounds on group rank 0 and the ratio gloo / shm
(> 1: shared memory is faster). Results are checked equal to gloo's before timing.
``--wait 20:10000 0:200`` adds one shared-memory column per wait policy SPIN_US:YIELD_US
(how long a rank busy-waits for its peers, then until when it calls sched_yield before it
starts to sleep), to compare wait policies side by side.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 32 << 20]


def _fmt_bytes(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"


def _time_calls(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _reps_for(nbytes: int, base: int) -> int:
    return max(5, min(base, int(base * (256 << 10) / max(nbytes, 256 << 10))))


def _wait_policy(text: str) -> tuple[float, float]:
    spin, _, yld = text.partition(":")
    return float(spin) * 1e-6, float(yld or 10_000) * 1e-6


def run_rank(args: argparse.Namespace) -> tuple[list[tuple], int]:
    """Body of one rank; returns (table rows as this rank timed them, threads per rank).

    A row is ``(dtype, bytes, [median seconds per column], calls per column)``; the columns
    are gloo followed by one shared-memory communicator per ``--wait`` policy."""
    from xtp.accelerators.cpu.shm import ShmCommunicator
    from xtp.accelerators.cpu.threads import apply_threads

    threads = apply_threads(args.tp)
    dist.init_process_group("gloo")
    comms = []
    for policy in args.wait or [None]:
        spin_s, yield_s = (None, None) if policy is None else _wait_policy(policy)
        shm, why = ShmCommunicator.create(
            None, chunk_bytes=args.chunk_bytes, timeout=120, spin_s=spin_s, yield_s=yield_s
        )
        if shm is None:
            raise SystemExit(f"shared-memory path unavailable: {why}")
        comms.append(shm)
    fns = [dist.all_reduce] + [c.all_reduce for c in comms]
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for nbytes in args.sizes:
            n = nbytes // dtype.itemsize
            x = (torch.arange(n) % 7 + dist.get_rank()).to(dtype)
            ref = x.clone()
            dist.all_reduce(ref)
            for fn in fns[1:]:
                mine = x.clone()
                fn(mine)
                if not torch.equal(ref, mine):
                    raise SystemExit(f"shm result differs from gloo for {dtype_name} {nbytes} B")
            reps = _reps_for(nbytes, args.reps)
            times: list[list[float]] = [[] for _ in fns]
            for _ in range(2):  # warm-up
                for fn in fns:
                    fn(x)
            for rnd in range(args.rounds):  # rotate the order so no column always goes first
                for k in range(len(fns)):
                    i = (k + rnd) % len(fns)
                    dist.barrier()
                    times[i] += _time_calls(lambda fn=fns[i], x=x: fn(x), reps)
            rows.append((dtype_name, nbytes, [statistics.median(t) for t in times], len(times[0])))
    for c in comms:
        c.close()
    dist.destroy_process_group()
    return rows, threads


def _spawned(rank: int, args: argparse.Namespace, port: int, queue) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(args.tp), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(args.tp), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    result = run_rank(args)
    if rank == 0:
        queue.put(result)


def table(runs: list[list[tuple]], args: argparse.Namespace, threads: int) -> str:
    """Markdown table; with several runs, each time is the median over runs and each ratio
    the median of the runs' ratios, with their range."""
    labels = ["xtp shm"] if not args.wait else [f"shm {w}" for w in args.wait]
    head = "| dtype | size | gloo (us) | " + " | ".join(
        f"{lab} (us) | gloo / {lab}" for lab in labels
    ) + " | calls/run |"
    lines = [
        f"date: {datetime.date.today()}  host: {platform.machine()}, {os.cpu_count()} CPUs "
        f"({len(os.sched_getaffinity(0))} usable)  torch {torch.__version__}  "
        f"python {platform.python_version()}",
        f"tp {args.tp}, {threads} thread(s)/rank, chunk {args.chunk_bytes or 'default'} B, "
        f"{len(runs)} run(s) of fresh ranks x {args.rounds} rounds; per run the median over "
        "all calls on group rank 0",
        f"command: {' '.join(['python', *sys.argv])}",
        "",
        head,
        "|---|---:|---:|" + "---:|---:|" * len(labels) + "---:|",
    ]
    for i, (dtype, nbytes, _, calls) in enumerate(runs[0]):
        per_run = [run[i][2] for run in runs]  # [run][column] seconds
        g = statistics.median(m[0] for m in per_run)
        cells = []
        for col in range(1, len(per_run[0])):
            t = statistics.median(m[col] for m in per_run)
            ratios = [m[0] / m[col] for m in per_run]
            spread = f" ({min(ratios):.1f}-{max(ratios):.1f})" if len(runs) > 1 else ""
            cells.append(f"{t * 1e6:.0f} | {statistics.median(ratios):.1f}x{spread}")
        lines.append(
            f"| {dtype} | {_fmt_bytes(nbytes)} | {g * 1e6:.0f} | {' | '.join(cells)} | {calls} |"
        )
    return "\n".join(lines)


def _spawn_run(args: argparse.Namespace) -> tuple[list[tuple], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_spawned, args=(r, args, port, queue)) for r in range(args.tp)]
    for proc in procs:
        proc.start()
    result = queue.get()
    for proc in procs:
        proc.join()
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--sizes", nargs="+", type=int, default=DEFAULT_SIZES, help="bytes")
    p.add_argument("--reps", type=int, default=200, help="calls per round at <= 256 KB")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeat", type=int, default=1, help="runs of fresh ranks (not torchrun)")
    p.add_argument("--chunk-bytes", type=int, default=None)
    p.add_argument(
        "--wait", nargs="*", default=None, metavar="SPIN_US:YIELD_US",
        help="wait policies, one shm column each (default: the built-in policy)",
    )
    args = p.parse_args(argv)
    if "RANK" in os.environ:  # under torchrun: one run
        rows, threads = run_rank(args)
        if int(os.environ["RANK"]) == 0:
            print(table([rows], args, threads))
        return
    runs = []
    for _ in range(args.repeat):
        rows, threads = _spawn_run(args)
        runs.append(rows)
    print(table(runs, args, threads))


if __name__ == "__main__":
    main()
