"""CPU benchmark: decode with linear weights dense, packed, or in huge pages, in the same ranks.

Run under torchrun (one thread per rank on a 2-core machine):

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/cpu_pack_ab.py bench/out/llama-1b-float32
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/cpu_pack_ab.py \\
        bench/out/llama-1b-bfloat16 --variants dense,packed,dense-huge,packed-huge

(the folders are the checkpoints ``xtp bench llama-1b`` saves). Each rank loads one model per
variant with ``xtp.from_pretrained`` (so memory is one shard per variant), then runs blocks of
``--block`` decode steps on each model in turn, the order reversed every other round, for
``--blocks`` rounds after a warm-up round. Separate runs on a shared VM differ by 10-20% in
fp32 decode (memory bandwidth taken by neighbours); blocks a few seconds apart in the same
processes see the same conditions, so their ratios are what the variant changes. List a
variant twice (``dense,dense``) to see the spread between identical models.

Variants (comma-separated, any order; the first is the baseline of the ratios):

* ``dense``: the weights as loaded;
* ``default``: ``xtp.pack_for_inference`` as ``xtp run``/``bench`` call it (bf16/fp16 packed
  for oneDNN, fp32 through xtp's GEMV kernel);
* ``packed``: ``xtp.pack_for_inference`` with every dtype oneDNN packs (fp32 included, which the
  default leaves dense: this is how that default was measured);
* ``*-huge``: after loading (and packing), every weight of 4 MiB or more is moved into 2 MiB
  transparent huge pages in place (``madvise(MADV_COLLAPSE)``, Linux 6.1+); the seconds that
  takes are printed. Not something xtp does: a measured lead, see bench/RESULTS.md.

Rank 0 prints the median ms/token of each variant and its ratio to the first.
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
KNOWN = ("dense", "default", "packed", "dense-huge", "packed-huge")


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


def decode_block(model, ids, steps: int) -> list[float]:
    """Prefill ``ids`` (a fresh cache: the same positions every block), then ``steps`` timed
    single-token steps; the first two are dropped."""
    out = model(ids, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        out = model(tok, past_key_values=cache, use_cache=True)
        tok, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
        times.append(time.perf_counter() - t0)
    return times[2:]


def main() -> int:
    import xtp
    from xtp.accelerators.cpu import CpuAccelerator
    from xtp.accelerators.cpu_packed_linear import PACKABLE_DTYPES

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
    models, notes = [], []
    for name in variants:
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
    ids = torch.randint(0, models[0].config.vocab_size, (1, 128),
                        generator=torch.Generator().manual_seed(0))
    times: list[list[float]] = [[] for _ in variants]
    with torch.no_grad():
        for rnd in range(args.blocks + 1):
            order = list(range(len(variants)))
            for i in order if rnd % 2 == 0 else order[::-1]:
                got = decode_block(models[i], ids, args.block)
                if rnd:  # round 0 is a warm-up
                    times[i] += got
    if rank == 0:
        base = statistics.median(times[0])
        print(f"{args.checkpoint}: world {torch.distributed.get_world_size()}; "
              + "; ".join(notes))
        print(f"decode ms/token, median of {len(times[0])} steps per variant "
              f"(blocks of {args.block}, interleaved):")
        for name, t in zip(variants, times):
            med = statistics.median(t)
            print(f"  {name:12s} {med * 1e3:7.1f}   {med / base:.3f} x {variants[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
