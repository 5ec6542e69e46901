"""Decode in the model, one rank's threads seen from the inside: which OpenMP runtimes the
process holds, whether each is torch's, and how busy every thread of rank 0 was.

Each rank (``torchrun --nproc-per-node N``) pins itself to its share of ``--cores`` CPUs (in
order), builds the model with seeded random weights, shards it with ``xtp.shard``, packs it
for inference and times ``--steps`` greedy decode steps after a 128-token prompt, then profiles
6 more. Rank 0 prints the median step time, the top operators, the OpenMP runtimes loaded
(with :func:`xtp.accelerators.cpu.openmp_team.follows_torch` for each) and the CPU ticks of its
busiest threads: a second OpenMP team shows as a second group of busy threads. Settings come
from the environment (``XTP_CPU_PACK``, ``XTP_CPU_GEMV_*``, ``OMP_WAIT_POLICY``), ``--tag``
names the run in the output. Results: bench/RESULTS.md (2026-12-03, night).

    CUDA_VISIBLE_DEVICES= XTP_ACCELERATOR=cpu torchrun --nproc-per-node 2 \\
        bench/cpu_decode_threads.py --cores 16 --tag default
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time


def thread_ticks() -> list[tuple[int, str]]:
    """``(user + system ticks, last CPU)`` of every thread of this process, busiest first."""
    out = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) + int(fields[12]), fields[36]))
    return sorted(out, reverse=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPUs shared by the ranks")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tag", default="")
    a = p.parse_args()
    local, world = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    per = a.cores // world
    os.sched_setaffinity(0, range(local * per, (local + 1) * per))  # before torch starts threads
    import torch
    import torch.distributed as dist

    import xtp
    from xtp.accelerators.cpu.openmp_team import follows_torch, loaded_runtimes
    from xtp.models.builtin import build_random, resolve_config

    torch.set_num_threads(per)
    dist.init_process_group("gloo")
    model = xtp.shard(build_random(resolve_config(a.model), getattr(torch, a.dtype)))
    xtp.pack_for_inference(model)
    ids = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        res = model(input_ids=ids, use_cache=True)
        key = "past_key_values" if "past_key_values" in res else "cache"
        state = [res[key], res.logits[:, -1:].argmax(-1)]

        def step() -> None:
            out = model(input_ids=state[1], use_cache=True, **{key: state[0]})
            state[:] = [out[key], out.logits[:, -1:].argmax(-1)]

        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(6):
                step()
    if local == 0:
        print(f"{a.tag} decode ms/token median {statistics.median(times[4:]):.1f} (all: "
              + " ".join(f"{t:.0f}" for t in times) + ")")
        for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total,
                        reverse=True)[:8]:
            print(f"   {e.self_cpu_time_total / 6e3:7.2f} ms/token {e.count / 6:5.1f} calls  "
                  f"{e.key}")
        with open("/proc/self/maps") as f:
            runtimes = loaded_runtimes(f.read())
        print("   OpenMP runtimes (path, torch's):", [
            (r, follows_torch(ctypes.CDLL(r, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)))
            for r in runtimes])
        ticks = thread_ticks()
        print(f"   threads {len(ticks)}; CPU ticks@last CPU of the busiest: "
              + " ".join(f"{t}@{c}" for t, c in ticks[:16]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
