"""GPU benchmark (issue 6): xtp at tp 1 vs the same model without xtp, and compiled decode.

Run on a machine with one CUDA GPU:

    python bench/gpu_tp1_overhead.py [--model llama-1b] [--steps 200] [--dtype bfloat16]

Measures, for a ~1B Llama-style model (xtp's built-in ``llama-1b``: hidden 2048, 16 layers,
32 heads, 8 KV heads, intermediate 5632, vocab 32000; random seeded weights), batch 1: prefill
latency (128 tokens, CUDA events) and per-token decode latency (single-token steps with a KV
cache), medians over ``--steps`` steps, for the plain model and the model after ``xtp.shard()``
at tp 1. The two are measured step by step in turn (the order flipped every step), so host
noise on a shared machine hits both alike. Then greedy decode through transformers' compiled
static-cache ``generate()`` (``torch.compile`` with CUDA graphs) for both models, with where
their tokens first differ from the plain model's eager ones.
Prints two tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


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


def ordered(models: dict, i: int) -> list:
    """The models in turn, the order flipped every step so neither always goes first."""
    items = list(models.items())
    return items if i % 2 == 0 else items[::-1]


def interleaved_steps(plain, sharded, ids, steps: int) -> dict[str, dict[str, float]]:
    """Prefill and decode medians for both models, measured step by step in turn (plain, xtp,
    plain, xtp, ...) so that host noise on this shared, launch-bound machine hits both alike."""
    models = {"plain": plain, "xtp tp1": sharded}
    times = {name: {"prefill": [], "decode": []} for name in models}
    state = {}
    with torch.no_grad():
        for i in range(steps + 8):
            for name, m in ordered(models, i):  # prefill, 128 tokens, timed with CUDA events
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                m(ids, use_cache=False)
                end.record()
                torch.cuda.synchronize()
                if i >= 8:
                    times[name]["prefill"].append(start.elapsed_time(end))
        for name, m in models.items():
            out = m(ids, use_cache=True)
            state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
        for i in range(steps + 8):
            for name, m in ordered(models, i):  # one decode step with the KV cache
                cache, tok = state[name]
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = m(tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                if i >= 8:
                    times[name]["decode"].append((time.perf_counter() - t0) * 1e3)
                state[name] = (out.past_key_values, tok)
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def eager_table(plain, sharded, ids, args, ready: float) -> None:
    """Prefill and decode of the plain and the xtp model, interleaved; prints the table."""
    rows = interleaved_steps(plain, sharded, ids, args.steps)
    print(f"GPU {torch.cuda.get_device_name(0)}  torch {torch.__version__}  "
          f"model {args.model} ({sum(p.numel() for p in plain.parameters()) / 1e9:.2f} B params) "
          f"{args.dtype} batch 1  prefill 128 tokens  decode {args.steps} steps; xtp.shard() took "
          f"{ready:.2f} s")
    print(f"{'variant':<28} {'prefill ms':>11} {'decode ms/token':>16}")
    base = rows["plain"]
    for name, r in rows.items():
        p, d = r["prefill"], r["decode"]
        print(f"{name:<28} {p:>11.3f} {d:>16.3f}   ratio vs plain: prefill "
              f"{p / base['prefill']:.3f}, decode {d / base['decode']:.3f}")


def main() -> int:
    import xtp
    from xtp.models.builtin import build_random, resolve_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--compile-only", action="store_true",
                    help="skip the eager timing table; only the compiled-generate comparison")
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    config = resolve_config(args.model)
    dtype = getattr(torch, args.dtype)
    plain = build_random(config, dtype).to(dev)
    sharded = build_random(config, dtype)
    t0 = time.perf_counter()
    xtp.shard(sharded)
    ready = time.perf_counter() - t0
    sharded.to(dev)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, 128), generator=g).to(dev)
    if not args.compile_only:
        eager_table(plain, sharded, ids, args, ready)
    # compiled decode with CUDA graphs: transformers' own path (a static KV cache makes
    # generate() compile the forward with mode="reduce-overhead", i.e. CUDA graphs). The plain
    # model goes through the same path, so a token difference can be told apart: compiled vs
    # eager rounding (both models differ alike) or xtp (only the xtp model differs).
    prompt = ids[:, :16]
    results = {}
    for name, m in (("plain", plain), ("xtp tp1", sharded)):
        m.generation_config.cache_implementation = None
        results[(name, "eager")] = generate_per_token_ms(m, prompt, 32)
        m.generation_config.cache_implementation = "static"
        try:
            results[(name, "compiled")] = generate_per_token_ms(m, prompt, 32)
        except Exception as exc:  # report precisely instead of failing the whole run
            print(f"{name}: compiled static-cache generate failed: {type(exc).__name__}: "
                  f"{str(exc)[:300]}")
    print(f"{'generate() per token':<28} {'ms/token':>16}   tokens")
    ref = results[("plain", "eager")][1]
    for (name, mode), (ms, out) in results.items():
        first = int((out != ref).int().argmax()) if not torch.equal(out, ref) else None
        where = "= plain eager" if first is None else f"differ from plain eager at position {first}"
        print(f"{name + ' ' + mode:<28} {ms:>16.3f}   {where}")
    if ("plain", "compiled") in results and ("xtp tp1", "compiled") in results:
        same = torch.equal(results[("plain", "compiled")][1], results[("xtp tp1", "compiled")][1])
        print(f"xtp compiled tokens == plain compiled tokens: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
