"""CPU benchmark: xtp's GEMV kernel on 1-16 threads against torch's own paths, per product, with
the machine's read bandwidth measured in the same run.

    python bench/cpu_gemv_threads.py                       # threads 1, 2, 4, ... up to the CPUs
    # the 16-core host, one dtype per command (each a few minutes):
    CUDA_VISIBLE_DEVICES= XTP_ACCELERATOR=cpu python bench/cpu_gemv_threads.py \
        --threads 1,2,4,8,16 --dtypes float32 --json bench/out/cpu-gemv-threads-fp32.json
    CUDA_VISIBLE_DEVICES= XTP_ACCELERATOR=cpu python bench/cpu_gemv_threads.py \
        --threads 1,2,4,8,16 --dtypes bfloat16 --json bench/out/cpu-gemv-threads-bf16.json

The kernel serves every thread count here (``XTP_CPU_GEMV_THREADS`` is set to the most asked
for), split across its own pool ("xtp pool") and, where torch's OpenMP runtime is found, across
torch's OpenMP threads ("xtp team", :mod:`xtp.accelerators.cpu.openmp_team`).

For each dtype (fp32, bf16), weight shape (llama-1b and Llama-3-8B projections by default),
input rows (1: one-token decode; 4 and 16: batched decode) and thread count
(``torch.set_num_threads``; the kernel splits a product across as many): the time of one
product and the weight bytes it reads per second, for xtp's kernel (``GemvLinear`` /
``Bf16GemvLinear``, the layers xtp packs decode weights into), torch's ``F.linear`` on the plain
weight (MKL in fp32, oneDNN in bf16) and, in bf16, oneDNN's packed layout (xtp's default for
bf16 on CPUs with AMX). Enough copies of each weight are cycled through to exceed ``--mib``
MiB (more than the last-level cache), so every product reads its weight from memory. The read
bandwidth is ``xtp.bench.rank.read_bandwidth`` (what ``xtp bench`` sets decode floors against:
``sum()`` over a 512 MiB tensor) at each thread count. Methods alternate within rounds; the
median round is reported. Prints a markdown table; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: (out, in): llama-1b q/o, gate/up, down; Llama-3-8B q/o, gate/up, down
SHAPES = [(2048, 2048), (8192, 2048), (2048, 8192), (4096, 4096), (14336, 4096), (4096, 14336)]


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _methods(dtype: torch.dtype, copies: list[torch.Tensor], rows: int, g: torch.Generator):
    from xtp.accelerators.cpu.gemv import Bf16GemvLinear, GemvLinear, kernel_isa, set_team_mode
    from xtp.accelerators.cpu.packed_linear import OneDNNPackedLinear, onednn_available

    x = torch.randn(rows, copies[0].shape[1], generator=g).to(dtype)
    kernel = [(GemvLinear if dtype == torch.float32 else Bf16GemvLinear)(w) for w in copies]

    def on_kernel(team: bool):
        def run():
            set_team_mode(team)  # the kernel's own pool, or torch's OpenMP threads
            return [k.matmul(x) for k in kernel]
        return run

    methods = {f"xtp pool ({kernel_isa()})": on_kernel(False),
               "F.linear": lambda: [F.linear(x, w) for w in copies]}
    if set_team_mode(True):  # torch's OpenMP runtime found: the kernel on its threads too
        methods[f"xtp team ({kernel_isa()})"] = on_kernel(True)
    if dtype == torch.bfloat16 and onednn_available():
        packed = [OneDNNPackedLinear(w) for w in copies]
        methods["oneDNN packed"] = lambda: [p.matmul(x) for p in packed]
    return methods


def _time(methods: dict, rounds: int) -> dict[str, float]:
    """Median seconds per pass of each method, methods alternating (rotating order) in rounds."""
    names, times = list(methods), {n: [] for n in methods}
    with torch.no_grad():
        for rnd in range(rounds + 1):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                t0 = time.perf_counter()
                methods[name]()
                if rnd:  # round 0 warms up
                    times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def run(args) -> dict:
    from xtp.bench.rank import read_bandwidth

    os.environ["XTP_CPU_GEMV_THREADS"] = str(max(args.threads))
    results, bandwidth = [], {}
    g = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        bandwidth[threads] = read_bandwidth(mib=args.read_mib)
        print(f"threads {threads}: read bandwidth {bandwidth[threads] / 1e9:.1f} GB/s",
              flush=True)
    for dtype in args.dtypes:
        for out_f, in_f in args.shapes:
            nbytes = out_f * in_f * dtype.itemsize
            n = max(2, -(-args.mib * 2**20 // nbytes))
            copies = [torch.randn(out_f, in_f, generator=g).to(dtype) for _ in range(n)]
            for rows in args.rows:
                methods = _methods(dtype, copies, rows, g)
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    per_pass = _time(methods, args.rounds)
                    for name, t in per_pass.items():
                        results.append(dict(
                            dtype=str(dtype).removeprefix("torch."), out=out_f, inp=in_f,
                            rows=rows, threads=threads, method=name, us=t / n * 1e6,
                            gbps=nbytes * n / t / 1e9,
                            read_gbps=bandwidth[threads] / 1e9))
                    line = ", ".join(f"{k} {nbytes * n / t / 1e9:.1f}"
                                     for k, t in per_pass.items())
                    print(f"{dtype} {out_f}x{in_f} rows {rows} threads {threads}: GB/s {line}",
                          flush=True)
                del methods
            del copies
    return dict(torch=torch.__version__, cpus=_cpus(), machine=platform.processor()
                or platform.machine(), cpu_model=_cpu_model(), mib=args.mib,
                rounds=args.rounds, read_bandwidth_gbps={t: b / 1e9 for t, b in bandwidth.items()},
                results=results)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(x for x in f if x.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor()


def table(report: dict) -> str:
    """The markdown table: one line per dtype, shape, rows and threads; per method us per
    product and GB/s; the kernel's share of the read bandwidth and its speed-up over each
    torch path."""
    rows: dict[tuple, dict[str, dict]] = {}
    for r in report["results"]:
        rows.setdefault((r["dtype"], r["out"], r["inp"], r["rows"], r["threads"]), {})[
            r["method"]] = r
    methods = list(dict.fromkeys(r["method"] for r in report["results"]))
    head = ["dtype", "out x in", "rows", "threads", "read GB/s"]
    head += [f"{m} us (GB/s)" for m in methods] + ["xtp / read", "xtp speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dtype, out_f, in_f, nrows, threads), by in rows.items():
        xtp = next(v for k, v in by.items() if k.startswith("xtp"))
        cells = [dtype, f"{out_f}x{in_f}", str(nrows), str(threads), f"{xtp['read_gbps']:.1f}"]
        cells += [f"{by[m]['us']:.0f} ({by[m]['gbps']:.1f})" if m in by else "-"
                  for m in methods]
        cells.append(f"{xtp['gbps'] / xtp['read_gbps']:.0%}")
        cells.append(" / ".join(f"{v['us'] / xtp['us']:.2f}x {k}" for k, v in by.items()
                                if v is not xtp))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cpus = _cpus()
    ap.add_argument("--threads", type=_ints,
                    default=[t for t in (1, 2, 4, 8, 16, 32, 64) if t <= cpus])
    ap.add_argument("--rows", type=_ints, default=[1, 4, 16])
    ap.add_argument("--shapes", type=lambda s: [tuple(_ints(v.replace("x", ",")))
                                                for v in s.split(";")], default=SHAPES,
                    help="out x in pairs, e.g. '2048x2048;8192x2048'")
    ap.add_argument("--dtypes", type=lambda s: [getattr(torch, v) for v in s.split(",")],
                    default=[torch.float32, torch.bfloat16])
    ap.add_argument("--mib", type=int, default=1024, help="weight copies per shape, in MiB")
    ap.add_argument("--read-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from xtp.accelerators.cpu.gemv import kernel_isa, unavailable_reason

    if not kernel_isa():
        print(f"no GEMV kernel here: {unavailable_reason()}")
        return 1
    print(f"torch {torch.__version__}, {cpus} CPUs ({_cpu_model()}), kernel {kernel_isa()}")
    report = run(args)
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
