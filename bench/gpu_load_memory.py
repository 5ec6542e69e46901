"""GPU benchmark (issue 6): peak GPU memory per rank of ``xtp.from_pretrained`` straight onto a GPU.

Run on a machine with a CUDA GPU:

    python bench/gpu_load_memory.py [--model llama-1b] [--dtype bfloat16] [--tp 1,2]

Saves the built-in model (seeded random weights) as a safetensors checkpoint in a temporary
folder, then for each tp starts tp fresh ranks (torchrun-style environment; tp 1 over NCCL,
tp > 1 over ``XTP_DIST_BACKEND=gloo`` with the ranks sharing GPU 0, since that measures
placement and memory, not speed). Each rank loads with ``xtp.from_pretrained`` and reports the
bytes of its own tensors (its shard), the device memory held after the load, and the peak
allocated during it (``torch.cuda.max_memory_allocated``). Prints one table: peak / shard.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, tp: int, port: int, folder: str, dtype_name: str, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(tp), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      XTP_ACCELERATOR="cuda", NCCL_NVLS_ENABLE="0",
                      TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    if tp > 1:
        os.environ["XTP_DIST_BACKEND"] = "gloo"
    import xtp

    torch.cuda.set_device(0)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    model = xtp.from_pretrained(folder, tp_size=tp, dtype=getattr(torch, dtype_name))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    own = {id(t): t.numel() * t.element_size()
           for t in list(model.parameters()) + list(model.buffers()) if t.is_cuda}
    queue.put(dict(rank=rank, tp=tp, seconds=seconds, shard=sum(own.values()),
                   held=torch.cuda.memory_allocated() - before,
                   peak=torch.cuda.max_memory_allocated() - before,
                   devices=sorted({str(p.device) for p in model.parameters()})))


def measure(tp: int, folder: str, dtype_name: str) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=rank_main, args=(r, tp, port, folder, dtype_name, queue))
             for r in range(tp)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    return sorted(results, key=lambda r: r["rank"])


def main() -> int:
    from xtp.models.builtin import build_random, resolve_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tp", default="1,2")
    args = ap.parse_args()
    mib = 1 << 20
    with tempfile.TemporaryDirectory() as tmp:
        build_random(resolve_config(args.model), getattr(torch, args.dtype)).save_pretrained(tmp)
        print(f"GPU {torch.cuda.get_device_name(0)}  torch {torch.__version__}  model "
              f"{args.model} {args.dtype}; tp 1 over NCCL, tp > 1 over gloo sharing GPU 0")
        print(f"{'tp':>3} {'rank':>4} {'shard MiB':>10} {'held MiB':>9} {'peak MiB':>9} "
              f"{'peak/shard':>10} {'load s':>7}  devices")
        for tp in (int(t) for t in args.tp.split(",")):
            for r in measure(tp, tmp, args.dtype):
                print(f"{tp:>3} {r['rank']:>4} {r['shard'] / mib:>10.1f} {r['held'] / mib:>9.1f} "
                      f"{r['peak'] / mib:>9.1f} {r['peak'] / r['shard']:>10.3f} "
                      f"{r['seconds']:>7.2f}  {','.join(r['devices'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
