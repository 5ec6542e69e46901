"""CPU benchmark: decode with linear weights dense, packed, in huge pages, or DeepSpeed AutoTP's
model, in the same ranks.

Run under torchrun (one thread per rank on a 2-core machine):

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/cpu_pack_ab.py bench/out/llama-1b-float32
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/cpu_pack_ab.py \\
        bench/out/llama-1b-bfloat16 --variants dense,packed,dense-huge,packed-huge
    DS_ACCELERATOR=cpu LOCAL_SIZE=2 OMP_NUM_THREADS=1 .venv-peers/bin/python -m \\
        torch.distributed.run --nproc-per-node 2 bench/cpu_pack_ab.py \\
        bench/out/llama-1b-float32 --variants default,deepspeed,dense

(the folders are the checkpoints ``xtp bench llama-1b`` saves). Each rank loads one model per
variant with ``xtp.from_pretrained`` (so memory is one shard per variant), then runs blocks of
``--block`` decode steps on each model in turn, the order reversed every other round, for
``--blocks`` rounds after a warm-up round. Separate runs on a shared VM differ by 10-20% in
fp32 decode (memory bandwidth taken by neighbours); blocks a few seconds apart in the same
processes see the same conditions, so their ratios are what the variant changes. List a
variant twice (``dense,dense``) to see the spread between identical models.

Variants (comma-separated, any order; the first is the baseline of the ratios):

* ``dense``: the weights as loaded;
* ``default``: ``xtp.pack_for_inference`` as ``xtp run``/``bench`` call it (fp32 and bf16
  through xtp's GEMV kernel, fp16 packed for oneDNN);
* ``packed``: ``xtp.pack_for_inference`` with every dtype oneDNN packs (fp32 included, which the
  default leaves dense: this is how that default was measured);
* ``deepspeed``: the checkpoint through ``deepspeed.init_inference`` AutoTP (as ``xtp bench``
  loads it; needs DeepSpeed, ``DS_ACCELERATOR=cpu`` and ``LOCAL_SIZE``), in the same ranks as
  xtp's models: the only side-by-side comparison with a peer that sees exactly the same
  machine conditions (run-to-run bandwidth swings of 10-40% on the shared VM);
* ``*-huge``: after loading (and packing), every weight of 4 MiB or more is moved into 2 MiB
  transparent huge pages in place (``madvise(MADV_COLLAPSE)``, Linux 6.1+); the seconds that
  takes are printed. Not something xtp does: a measured lead, see bench/RESULTS.md.

Rank 0 prints the median ms/token of each variant and its ratio to the first (and, for the
``default`` variant, the share of the step spent in xtp's GEMV kernel), and, after
each round, the ranks read 512 MiB each with ``sum()`` at once (``xtp.bench.rank.
read_bandwidth``): the floor of that round is the weight bytes read per decode step
(``xtp.bench.prep.weight_bytes``) over the ranks' summed read bandwidth, and each variant's
decode / floor is paired within rounds (median over rounds).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25
KNOWN = ("dense", "default", "packed", "deepspeed", "dense-huge", "packed-huge")


@functools.cache
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def collapse_to_huge_pages(ptr: int, nbytes: int) -> int:
    """Bytes of ``[ptr, ptr + nbytes)`` (its whole 2 MiB pages) now in huge pages; 0 where the
    kernel refused (older than 6.1, THP off, no free huge pages)."""
    start = -(-ptr // HUGE_PAGE) * HUGE_PAGE
    end = (ptr + nbytes) // HUGE_PAGE * HUGE_PAGE
    if end - start < HUGE_PAGE or _madvise()(start, end - start, MADV_COLLAPSE) != 0:
        return 0
    return end - start


def weights_to_huge_pages(model) -> int:
    """Collapse every weight of 2 huge pages or more (packed or dense) into huge pages."""
    done = 0
    for module in model.modules():
        packed = module.__dict__.get("tp_packed")
        if packed is not None:
            inner = packed._packed
            done += collapse_to_huge_pages(torch.ops.mkldnn.data_ptr(inner),
                                           torch.ops.mkldnn._nbytes(inner))
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            nbytes = t.numel() * t.element_size()
            if t.layout == torch.strided and 0 not in t.stride() and nbytes >= 2 * HUGE_PAGE:
                done += collapse_to_huge_pages(t.data_ptr(), nbytes)
    return done


class KernelClock:
    """Stands in for xtp's compiled GEMV module (``cpu_gemv._kernel``): adds up the seconds
    its calls take. Only xtp's ``default`` variant calls the kernel."""

    def __init__(self, kernel) -> None:
        self.kernel, self.seconds = kernel, 0.0
        self.isa = kernel.isa

    def __getattr__(self, name):  # everything else (unpack_bf16, ...): the module's own
        return getattr(self.kernel, name)

    def gemv(self, *args) -> None:
        t0 = time.perf_counter()
        self.kernel.gemv(*args)
        self.seconds += time.perf_counter() - t0

    def gemv_bf16(self, *args) -> None:
        t0 = time.perf_counter()
        self.kernel.gemv_bf16(*args)
        self.seconds += time.perf_counter() - t0


def decode_block(model, ids, steps: int, clock: KernelClock | None = None
                 ) -> tuple[list[float], float]:
    """Prefill ``ids`` (a fresh cache: the same positions every block), then ``steps`` timed
    single-token steps (the first two are dropped): their times, and the seconds the GEMV
    kernel took in them (0 without ``clock``)."""
    out = model(ids, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times, kernel_start = [], 0.0
    for i in range(steps + 2):
        if i == 2 and clock is not None:
            kernel_start = clock.seconds
        t0 = time.perf_counter()
        out = model(tok, past_key_values=cache, use_cache=True)
        tok, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
        times.append(time.perf_counter() - t0)
    return times[2:], (clock.seconds - kernel_start) if clock is not None else 0.0


def main() -> int:
    import xtp
    from xtp.accelerators.cpu import gemv as cpu_gemv
    from xtp.accelerators.cpu.packed_linear import PACKABLE_DTYPES
    from xtp.accelerators.devices.cpu import CpuAccelerator
    from xtp.bench.prep import weight_bytes
    from xtp.bench.rank import read_bandwidth

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--variants", default="dense,packed", help=f"from {', '.join(KNOWN)}")
    ap.add_argument("--block", type=int, default=8, help="decode steps per block")
    ap.add_argument("--blocks", type=int, default=6, help="timed rounds of blocks")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(KNOWN))
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}")
    torch.set_num_threads(1)
    if not torch.distributed.is_initialized():  # gloo for xtp and DeepSpeed alike
        torch.distributed.init_process_group("gloo")
    from xtp.bench.leaks import collect_leaks, shm_files

    shm_before = shm_files()
    models, notes = [], []
    for name in variants:
        if name == "deepspeed":
            import transformers

            from xtp.bench.rank import load

            dtype = transformers.AutoConfig.from_pretrained(args.checkpoint).dtype
            models.append(load("deepspeed", args.checkpoint, torch.distributed.get_world_size(),
                               dtype, torch.device("cpu")))
            continue
        model = xtp.from_pretrained(args.checkpoint, progress=False)
        if name == "default":
            n = xtp.pack_for_inference(model)
            kinds = sorted({type(m.__dict__["tp_packed"]).__name__ for m in model.modules()
                            if "tp_packed" in m.__dict__})
            notes.append(f"{name}: {n} weights in {'/'.join(kinds) or 'no other layout'}")
        if name.startswith("packed"):
            n = xtp.pack_for_inference(model, CpuAccelerator(pack_dtypes=PACKABLE_DTYPES))
            notes.append(f"{name}: {n} weights packed")
        if name.endswith("-huge"):
            t = time.perf_counter()
            moved = weights_to_huge_pages(model)
            notes.append(f"{name}: {moved / 2**20:.0f} MiB moved to huge pages in "
                         f"{time.perf_counter() - t:.1f} s")
        models.append(model)
    rank = torch.distributed.get_rank()
    per_step = weight_bytes(Path(args.checkpoint), str(models[0].dtype).removeprefix("torch."))[1]
    floors: list[float] = []
    ids = torch.randint(0, models[0].config.vocab_size, (1, 128),
                        generator=torch.Generator().manual_seed(0))
    times: list[list[list[float]]] = [[] for _ in variants]  # [variant][round][step]
    kernel_s = [0.0] * len(variants)
    clock = None
    if "default" in variants and cpu_gemv.kernel_isa():
        clock = cpu_gemv._kernel = KernelClock(cpu_gemv._kernel)
    with torch.no_grad():
        for rnd in range(args.blocks + 1):
            order = list(range(len(variants)))
            for i in order if rnd % 2 == 0 else order[::-1]:
                got, in_kernel = decode_block(models[i], ids, args.block, clock)
                if rnd:  # round 0 is a warm-up
                    times[i].append(got)
                    kernel_s[i] += in_kernel
            if rnd:
                bandwidth = torch.tensor([read_bandwidth()], dtype=torch.float64)
                torch.distributed.all_reduce(bandwidth)
                floors.append(per_step / float(bandwidth))
    if rank == 0:
        flat = [[x for block in t for x in block] for t in times]
        base = statistics.median(flat[0])
        print(f"{args.checkpoint}: world {torch.distributed.get_world_size()}; "
              + "; ".join(notes))
        print(f"floor per round (ms): {' '.join(f'{f * 1e3:.1f}' for f in floors)}")
        print(f"decode ms/token, median of {len(flat[0])} steps per variant "
              f"(blocks of {args.block}, interleaved); decode / floor paired in rounds:")
        for name, t, blocks in zip(variants, flat, times):
            med = statistics.median(t)
            over = statistics.median(statistics.median(b) / f for b, f in zip(blocks, floors))
            print(f"  {name:12s} {med * 1e3:7.1f}   {med / base:.3f} x {variants[0]}   "
                  f"{over:.2f} x floor")
        for name, model, t, k in zip(variants, models, flat, kernel_s):
            if k:  # rank 0's share of the step in xtp's GEMV kernel, and its read speed
                nbytes = sum(m.__dict__["tp_packed"].nbytes for m in model.modules()
                             if type(m.__dict__.get("tp_packed")).__name__
                             in ("GemvLinear", "Bf16GemvLinear"))
                print(f"  {name}: GEMV kernel {k / len(t) * 1e3:.1f} ms of the step "
                      f"({k / sum(t):.0%}), reading {nbytes * len(t) / k / 1e9:.1f} GB/s "
                      "(rank 0)")
    torch.distributed.barrier()
    if rank == 0:  # DeepSpeed's all-reduce buffers stay in /dev/shm unless removed
        left = collect_leaks(shm_before)
        if left["files"]:
            print(f"/dev/shm: {left['files']} new file(s), {left['mib']:.0f} MiB; removed: "
                  f"{', '.join(left['removed']) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
