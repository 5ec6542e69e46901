"""GPU benchmark (issue 6): xtp at tp 1 vs the same model without xtp, and compiled decode.

Run on a machine with one CUDA GPU:

    python bench/gpu_tp1_overhead.py [--model llama-1b] [--steps 64]

Measures, for a ~1B Llama-style model (xtp's built-in ``llama-1b``: hidden 2048, 16 layers,
32 heads, 8 KV heads, intermediate 5632, vocab 32000; random seeded weights) in bf16, batch 1:
prefill latency (128 tokens, median of 20, CUDA events) and per-token decode latency (median
over ``--steps`` single-token steps with the KV cache), for the plain model and the model after
``xtp.shard()`` at tp 1, measured alternately (A B A B A B, after one discarded warm-up run each) so drift hits both. Then decode through
transformers' compiled static-cache ``generate()`` (``torch.compile`` with CUDA graphs) on the
xtp model.
Prints one table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def prefill_ms(model, ids, reps=20) -> float:
    times = []
    with torch.no_grad():
        for _ in range(3):
            model(ids, use_cache=False)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(ids, use_cache=False)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def decode_ms(model, ids, steps: int) -> float:
    """Median latency of one-token steps with a dynamic KV cache."""
    times = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        for i in range(steps + 5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            if i >= 5:
                times.append((time.perf_counter() - t0) * 1e3)
            cache = out.past_key_values
    return statistics.median(times)


def generate_per_token_ms(model, ids, steps: int) -> float:
    """Per-token decode time through generate(): (T(steps+1 tokens) - T(1 token)) / steps."""
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=steps + 1, **kw)  # warm-up / compile
        model.generate(ids, max_new_tokens=steps + 1, **kw)
        res = []
        for n in (1, steps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=n, **kw)
            torch.cuda.synchronize()
            res.append(time.perf_counter() - t0)
    return (res[1] - res[0]) / steps * 1e3, out


def main() -> int:
    import xtp
    from xtp.builtin_models import build_random, resolve_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    config = resolve_config(args.model)
    dtype = torch.bfloat16
    plain = build_random(config, dtype).to(dev)
    sharded = build_random(config, dtype)
    t0 = time.perf_counter()
    xtp.shard(sharded)
    ready = time.perf_counter() - t0
    sharded.to(dev)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, 128), generator=g).to(dev)
    rows = {"plain": {"prefill": [], "decode": []}, "xtp tp1": {"prefill": [], "decode": []}}
    for m in (plain, sharded):  # warm-up: allocator growth, kernel selection, cache shapes
        prefill_ms(m, ids, reps=3)
        decode_ms(m, ids, 8)
    for _ in range(3):
        for name, m in (("plain", plain), ("xtp tp1", sharded)):
            rows[name]["prefill"].append(prefill_ms(m, ids))
            rows[name]["decode"].append(decode_ms(m, ids, args.steps))
    print(f"GPU {torch.cuda.get_device_name(0)}  torch {torch.__version__}  "
          f"model {args.model} ({sum(p.numel() for p in plain.parameters()) / 1e9:.2f} B params) "
          f"bf16 batch 1  prefill 128 tokens  decode {args.steps} steps; xtp.shard() took "
          f"{ready:.2f} s")
    print(f"{'variant':<28} {'prefill ms':>11} {'decode ms/token':>16}")
    base = {k: statistics.median(v) for k, v in rows["plain"].items()}
    for name, r in rows.items():
        p, d = statistics.median(r["prefill"]), statistics.median(r["decode"])
        print(f"{name:<28} {p:>11.3f} {d:>16.3f}   ratio vs plain: prefill "
              f"{p / base['prefill']:.3f}, decode {d / base['decode']:.3f}")
    # compiled decode with CUDA graphs on the xtp model: transformers' own path (a static KV
    # cache makes generate() compile the forward with mode="reduce-overhead", i.e. CUDA graphs)
    eager_gen, eager_out = generate_per_token_ms(sharded, ids[:, :16], 32)
    sharded.generation_config.cache_implementation = "static"
    try:
        comp_gen, comp_out = generate_per_token_ms(sharded, ids[:, :16], 32)
        same = bool(torch.equal(comp_out, eager_out))
        print(f"{'xtp tp1 generate eager':<28} {'':>11} {eager_gen:>16.3f}")
        print(f"{'xtp tp1 compile+cudagraphs':<28} {'':>11} {comp_gen:>16.3f}   "
              f"same tokens as eager: {same}")
    except Exception as exc:  # report precisely instead of failing the whole run
        print(f"compiled static-cache generate failed: {type(exc).__name__}: {str(exc)[:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
