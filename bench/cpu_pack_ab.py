"""CPU benchmark: decode with packed vs dense linear weights, in the same ranks, interleaved.

Run under torchrun (one thread per rank on a 2-core machine):

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/cpu_pack_ab.py bench/out/llama-1b-float32
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/cpu_pack_ab.py bench/out/llama-1b-bfloat16

(the folders are the checkpoints ``xtp bench llama-1b`` saves). The ranks load the checkpoint
once with ``xtp.from_pretrained``, then alternate blocks of ``--block`` decode steps with the
weights dense and packed (``xtp.pack_for_inference`` / ``xtp.unpack`` between blocks, not
timed), ``--blocks`` blocks each. Separate runs on a shared VM differ by 10-20% in fp32 decode
(memory bandwidth taken by neighbours); blocks a few seconds apart in the same processes see
the same conditions, so their ratio is what packing changes. Rank 0 prints medians and the
ratio packed / dense.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def decode_block(model, cache, tok, steps: int):
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t0)
        cache = out.past_key_values
    return times, cache, tok


def main() -> int:
    import xtp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--block", type=int, default=8, help="decode steps per block")
    ap.add_argument("--blocks", type=int, default=6, help="blocks per variant")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = xtp.from_pretrained(args.checkpoint, progress=False)
    rank = torch.distributed.get_rank()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=gen)
    times = {"dense": [], "packed": []}
    with torch.no_grad():
        for i in range(args.blocks * 2 + 1):
            variant = "packed" if i % 2 else "dense"
            if variant == "packed":
                packed = xtp.pack_for_inference(model)
            else:
                xtp.unpack(model)
            out = model(ids, use_cache=True)  # fresh cache per block: same positions each time
            got, _, _ = decode_block(model, out.past_key_values, out.logits[:, -1:].argmax(-1),
                                     args.block + 2)
            if i:  # block 0 is a warm-up
                times[variant] += got[2:]
    if rank == 0:
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{args.checkpoint}: world {torch.distributed.get_world_size()}, {packed} weights "
              f"packed per rank; decode ms/token (median of {len(times['dense'])} steps each, "
              f"blocks of {args.block} interleaved): dense {med['dense']:.1f}, packed "
              f"{med['packed']:.1f}, packed/dense {med['packed'] / med['dense']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
