"""CPU benchmark: eager vs torch.compile decode of one implementation, in the same ranks.

Run under torchrun, one thread per rank (DeepSpeed from the peers' venv, see setup_peers.sh):

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 bench/cpu_compile_ab.py bench/out/llama-1b-float32
    DS_ACCELERATOR=cpu LOCAL_SIZE=2 OMP_NUM_THREADS=1 .venv-peers/bin/python -m \\
        torch.distributed.run --nproc-per-node 2 bench/cpu_compile_ab.py \\
        bench/out/llama-1b-float32 --impl deepspeed

Each rank loads the checkpoint once in ``--dtype`` (``--impl xtp``: ``xtp.from_pretrained``,
packed for inference with ``--pack``; ``deepspeed``: transformers then
``deepspeed.init_inference`` AutoTP) and decodes ``--steps`` tokens after a 128-token prompt
three ways, in turn for ``--rounds`` rounds (order reversed every other round):
eager with transformers' ``DynamicCache`` (what ``xtp bench`` times), eager with a
``StaticCache``, and ``torch.compile(model)`` with a ``StaticCache`` (compiled once before the
rounds; the seconds are printed). Rank 0 prints each variant's median ms/token, its ratio to
eager-dynamic, and whether the three decoded the same greedy tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = 128


def load(impl: str, path: str, tp: int, dtype: torch.dtype, pack: bool):
    if impl == "xtp":
        import xtp

        model = xtp.from_pretrained(path, tp_size=tp, dtype=dtype, progress=False)
        if pack:
            xtp.pack_for_inference(model)
        return model
    import deepspeed
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp},
                                      dtype=dtype, replace_with_kernel_inject=False)
    return engine.module.eval()


def decode(model, forward, static: bool, ids, steps: int) -> tuple[list[float], list[int]]:
    """Prefill with ``model``, then ``steps`` timed single-token steps through ``forward``
    (the first two dropped); returns the times and the greedy tokens."""
    from transformers import DynamicCache, StaticCache

    cache = (StaticCache(config=model.config, max_cache_len=PROMPT + steps + 4) if static
             else DynamicCache(config=model.config))
    times, tokens = [], []
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(PROMPT))
        tok = out.logits[:, -1:].argmax(-1)
        for i in range(steps):
            t = time.perf_counter()
            out = forward(tok, past_key_values=cache, use_cache=True,
                          cache_position=torch.tensor([PROMPT + i]))
            tok = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
            tokens.append(int(tok))
    return times[2:], tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--impl", choices=("xtp", "deepspeed"), default="xtp")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per block")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--pack", action="store_true",
                    help="xtp: pack for inference first (CPU: bf16/fp16 for oneDNN, fp32 for "
                    "the GEMV kernel)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    model = load(args.impl, args.checkpoint, tp, getattr(torch, args.dtype), args.pack)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT),
                        generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, dynamic=False)
    t = time.perf_counter()
    decode(model, compiled, True, ids, 6)
    warm = time.perf_counter() - t
    variants = {"eager-dynamic": (model, False), "eager-static": (model, True),
                "compiled-static": (compiled, True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    tokens: dict[str, list[int]] = {}
    for rnd in range(args.rounds):
        names = list(variants) if rnd % 2 == 0 else list(variants)[::-1]
        for name in names:
            got, tokens[name] = decode(model, *variants[name], ids, args.steps)
            times[name] += got
    if rank == 0:
        base = statistics.median(times["eager-dynamic"])
        print(f"{args.impl}{' packed' if args.pack else ''} tp {tp}, {args.checkpoint} "
              f"({args.dtype}): compiled in {warm:.1f} s; decode "
              f"ms/token, median of {len(times['eager-dynamic'])} steps per variant:")
        for name, got in times.items():
            med = statistics.median(got)
            print(f"  {name:16s} {med * 1e3:7.1f}   {med / base:.3f} x eager-dynamic")
        print("  same greedy tokens:", len({tuple(v) for v in tokens.values()}) == 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
