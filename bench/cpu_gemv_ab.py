"""CPU benchmark: one-token matmuls through xtp's GEMV kernel vs torch's own paths (fp32:
``F.linear``, i.e. MKL; bf16: ``F.linear`` and oneDNN's packed weight), with ``Tensor.sum`` over
the same bytes as the read-speed reference.

    python bench/cpu_gemv_ab.py                 # one process, one thread, fp32
    python bench/cpu_gemv_ab.py --procs 2       # one process per core at once (as tp 2 runs)
    python bench/cpu_gemv_ab.py --dtype bfloat16

The weights are the tp-2 shards of the 0.85B Llama of bench/RESULTS.md (per layer: q 1024x2048,
k and v 256x2048, o 2048x1024, gate and up 2816x2048, down 2048x2816), ``--layers`` layers of
them (default 8: ~720 MB, far beyond any cache), random values. Each round times one pass over
all of them per method, in turn (the order rotating); each process prints the median ms per
pass and GB/s per method, and the kernel's speed-up over F.linear paired within rounds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHARD_SHAPES = [(1024, 2048), (256, 2048), (256, 2048), (2048, 1024), (2816, 2048),
                (2816, 2048), (2048, 2816)]


def run(layers: int, rounds: int, cpu: int | None, barrier=None, out=None,
        dtype: str = "float32") -> str:
    """Time the methods in this process (pinned to ``cpu`` where given); with ``barrier``,
    every round starts when all processes reach it; the report goes to ``out`` if given."""
    text = _run(layers, rounds, cpu, barrier, getattr(torch, dtype))
    if out is not None:
        out.put((cpu, text))
    return text


def _run(layers: int, rounds: int, cpu: int | None, barrier, dtype: torch.dtype) -> str:
    from xtp.accelerators.cpu.gemv import Bf16GemvLinear, GemvLinear, kernel_isa, unavailable_reason
    from xtp.accelerators.cpu.packed_linear import OneDNNPackedLinear

    if not kernel_isa():
        return f"no GEMV kernel here: {unavailable_reason()}"
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(cpu or 0)
    weights = [torch.randn(o, i, generator=g).to(dtype) for _ in range(layers)
               for o, i in SHARD_SHAPES]
    kernels = [(GemvLinear if dtype == torch.float32 else Bf16GemvLinear)(w) for w in weights]
    xs = {i: torch.randn(1, i, generator=g).to(dtype) for _, i in SHARD_SHAPES}
    nbytes = sum(w.numel() * w.element_size() for w in weights)

    def linear():
        for w in weights:
            F.linear(xs[w.shape[1]], w)

    def gemv():
        for k in kernels:
            k.matmul(xs[k.shape[1]])

    def read():
        for w in weights:
            w.sum()

    methods = {"F.linear": linear, f"xtp gemv ({kernel_isa()})": gemv, "sum() (read)": read}
    if dtype == torch.bfloat16:  # oneDNN's packed layout: torch's fastest bf16 path
        onednn = [OneDNNPackedLinear(w) for w in weights]
        methods["oneDNN packed"] = lambda: [p.matmul(xs[p.shape[1]]) for p in onednn]
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    with torch.no_grad():
        for rnd in range(rounds + 1):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                if barrier is not None:
                    barrier.wait()
                t0 = time.perf_counter()
                methods[name]()
                if rnd:  # round 0 warms up
                    times[name].append(time.perf_counter() - t0)
    lines = [f"cpu {cpu}: {nbytes / 1e9:.2f} GB of {dtype} weights, {rounds} rounds"]
    for name, t in times.items():
        med = statistics.median(t)
        lines.append(f"  {name:18s} {med * 1e3:8.2f} ms/pass  {nbytes / med / 1e9:5.1f} GB/s")
    for other in [n for n in names if n.startswith(("F.linear", "oneDNN"))]:
        pair = [a / b for a, b in zip(times[other], times[names[1]])]
        lines.append(f"  gemv speed-up over {other}, paired in rounds: "
                     f"{statistics.median(pair):.2f}x (range {min(pair):.2f}-{max(pair):.2f})")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, default=1, help="processes at once, one per core")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.procs} process(es)")
    if args.procs == 1:
        print(run(args.layers, args.rounds, None, dtype=args.dtype))
        return 0
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(args.procs), ctx.Queue()
    procs = [ctx.Process(target=run, args=(args.layers, args.rounds, c % (os.cpu_count() or 1),
                                           barrier, out, args.dtype))
             for c in range(args.procs)]
    for p in procs:
        p.start()
    reports = sorted(out.get() for _ in procs)
    for p in procs:
        p.join()
    print("\n".join(text for _, text in reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
