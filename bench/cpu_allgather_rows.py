"""All-gather along the last dimension through xtp's shared-memory communicator: the row-wise
path (each rank's rows land in their columns, no transposed copies) against the transposing
path it replaced (move the gathered dimension to the front, gather, move it back: two
transposed copies of the whole tensor), side by side in the same ranks.

The tensor is what a vocab-parallel LM head all-gathers after a prefill: logits ``(batch,
tokens, vocab / tp)``. Run under torchrun (CPU, gloo for setup)::

    torchrun --nproc-per-node 2 bench/cpu_allgather_rows.py --shape 4,128,64128 --dtype bfloat16

Rank 0 prints the median milliseconds of each path per round (rounds alternate the order) and
checks both results equal. The transposing path is rebuilt from the public API (a gather along
the first dimension, which is still how the communicator gathers there and along a later
dimension whose rows do not fit a slot).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from xtp.accelerators import ShmCommunicator


def transposing(comm: ShmCommunicator, x: torch.Tensor) -> torch.Tensor:
    """The previous all-gather along the last dimension: that dimension moved to the front,
    gathered along it (the flat path), moved back."""
    return comm.all_gather(x.movedim(-1, 0).contiguous(), 0).movedim(0, -1).contiguous()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4,128,64128", help="this rank's part (default: llama-3 "
                    "vocabulary at tp 2, 4 x 128 tokens)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(a.threads)
    comm, why = ShmCommunicator.create(None, timeout=120)
    if comm is None:
        raise SystemExit(f"no shared-memory communicator here: {why}")
    shape = tuple(int(s) for s in a.shape.split(","))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(dist.get_rank()))
    x = x.to(getattr(torch, a.dtype))
    paths = {"row-wise": lambda: comm.all_gather(x, -1), "transposing": lambda: transposing(
        comm, x)}
    assert torch.equal(paths["row-wise"](), paths["transposing"]())
    times: dict[str, list[float]] = {k: [] for k in paths}
    for rnd in range(a.rounds):
        for name in (list(paths) if rnd % 2 == 0 else list(paths)[::-1]):
            got = []
            for _ in range(a.reps):
                dist.barrier()
                t = time.perf_counter()
                paths[name]()
                got.append(time.perf_counter() - t)
            times[name].append(statistics.median(got) * 1e3)
    if dist.get_rank() == 0:
        out_mb = x.numel() * x.element_size() * comm.world_size / 2**20
        print(f"all_gather dim -1, part {shape} {a.dtype} x {comm.world_size} ranks "
              f"({out_mb:.0f} MiB out), {a.threads} thread(s) per rank; ms per call, "
              f"median of {a.reps} per round:")
        for name, got in times.items():
            print(f"  {name:12s} " + "  ".join(f"{v:7.1f}" for v in got))
        ratio = statistics.median(times["transposing"]) / statistics.median(times["row-wise"])
        print(f"  transposing / row-wise: {ratio:.1f}x")
    comm.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
