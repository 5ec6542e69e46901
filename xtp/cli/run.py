"""``xtp run [MODEL] --tp N``: load MODEL sharded over N local ranks, generate, report.

Outside ``torchrun`` it starts the N ranks itself with torch's elastic launcher
(``torch.distributed.launcher.api.elastic_launch``, via :mod:`xtp.cli.launch`), one process
per rank.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from ..models.builtin import DEFAULT_MODEL
from .options import add_pack_option, apply_pack_option
from .placement import tp_arg


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="generate with a model sharded over N local ranks",
        description="Shard MODEL over --tp ranks, generate greedily from a prompt, and print the "
        "tokens, tokens/s, time to ready and peak memory per rank. With no MODEL, a tiny Llama "
        "with seeded random weights is built in memory (no download), and the sharded tokens are "
        "checked against the unsharded model.",
        epilog="examples:\n  xtp run --tp 2\n  xtp run llama-1b --tp auto --max-new-tokens 16\n"
        "  torchrun --nproc-per-node 2 -m xtp.cli.main run --tp 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="built-in name, config JSON or checkpoint folder "
                   f"(default {DEFAULT_MODEL})")
    p.add_argument("--tp", type=tp_arg, default=1,
                   help="tensor-parallel size, or auto: chosen from the host's sockets, NUMA "
                   "nodes and cores, with the reason printed (default 1). On the CPU each "
                   "rank is pinned to its own physical cores (XTP_PIN=0: not pinned)")
    p.add_argument("--prompt", default="0 1 2 3 4 5 6 7",
                   help="token ids separated by spaces (random-weight models have no tokenizer) "
                   "or text when MODEL has a tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-check", action="store_true",
                   help="skip the comparison with the unsharded model")
    p.add_argument("--eager", action="store_true",
                   help="decode eagerly even where the accelerator decodes faster compiled "
                   "(CUDA: torch.compile over a static KV cache, replayed as CUDA graphs)")
    add_pack_option(p)
    p.set_defaults(func=run)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode_kwargs(accelerator, max_new: int, eager: bool) -> dict:
    """``generate()`` arguments for greedy decode: a static KV cache where the accelerator
    decodes faster compiled (transformers then compiles the forward and, on CUDA, replays it as
    CUDA graphs), else transformers' default dynamic cache (eager)."""
    kwargs = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    if accelerator.compiled_decode and not eager:
        kwargs["cache_implementation"] = "static"
    return kwargs


def rank_main(model_name: str, tp: int, prompt: str, max_new: int, dtype_name: str,
              check: bool, eager: bool = False) -> dict:
    """One rank's work; returns what rank 0 prints."""
    import torch

    import xtp

    from ..models.builtin import build_random, resolve_config
    from ..sharding.state import sharded_plan

    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    ctx = xtp.init_distributed(tp)
    config = resolve_config(model_name)
    tokenizer = None
    if os.path.isdir(model_name):
        model = xtp.from_pretrained(model_name, tp_size=tp, dtype=dtype, context=ctx)
        try:
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(model_name,
                                                                   local_files_only=True)
        except Exception:
            tokenizer = None
        ref = None
    else:
        model = build_random(config, dtype)
        ref = build_random(config, dtype) if check else None
        xtp.shard(model, context=ctx)
    packed = xtp.pack_for_inference(model)
    ready = time.perf_counter() - t0
    if tokenizer is not None and not _token_ids(prompt):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:
        ids = torch.tensor([[int(t) % config.vocab_size for t in prompt.split()]])
    ids = ids.to(ctx.device)
    gen_kwargs = decode_kwargs(ctx.accelerator, max_new, eager)
    compiled = "cache_implementation" in gen_kwargs
    with torch.no_grad():
        # warm-up: the whole generation when compiled (it compiles for these cache shapes)
        model.generate(ids, **(gen_kwargs if compiled else dict(gen_kwargs, max_new_tokens=2)))
        ctx.accelerator.synchronize()
        t1 = time.perf_counter()
        out = model.generate(ids, **gen_kwargs)
        ctx.accelerator.synchronize()
        elapsed = time.perf_counter() - t1
        matches = None
        if ref is not None:
            matches = bool(torch.equal(ref.to(ctx.device).generate(ids, **gen_kwargs), out))
    new = out[0, ids.shape[1]:].tolist()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    gpu_peak = ctx.accelerator.max_memory_allocated()
    return {
        "rank": ctx.rank, "tokens": new,
        "text": tokenizer.decode(new) if tokenizer is not None else None,
        "tok_per_s": len(new) / elapsed if elapsed else float("nan"),
        "ready_s": ready, "peak_rss_mib": _peak_rss_mib(),
        "peak_device_mib": gpu_peak / 2**20 if gpu_peak else None,
        "matches_unsharded": matches, "device": str(ctx.device), "packed": packed,
        "decode": "compiled, static cache" if compiled else "eager",
        "cpus": cpus, "threads": torch.get_num_threads(),
        "bytes_per_rank": sharded_plan(model).bytes_per_rank(ctx.tp_rank)
        if sharded_plan(model) else None,
    }


def _report(results: list[dict], args) -> int:
    from ..accelerators.cpu.cpu_topology import format_cpulist

    r0 = results[0]
    print(f"model {args.model}  tp {args.tp}  dtype {args.dtype}  device {r0['device']}")
    print(f"generated token ids: {r0['tokens']}")
    if r0["text"] is not None:
        print(f"text: {r0['text']}")
    print(f"decode speed: {r0['tok_per_s']:.1f} tokens/s ({r0['decode']})"
          + (f" ({r0['packed']} linear weights per rank packed for inference)"
             if r0["packed"] else ""))
    for r in results:
        mem = f"peak RSS {r['peak_rss_mib']:.0f} MiB"
        if r["peak_device_mib"]:
            mem += f", peak device memory {r['peak_device_mib']:.0f} MiB"
        shard = f", shard {r['bytes_per_rank'] / 2**20:.1f} MiB" if r["bytes_per_rank"] else ""
        where = ""
        if r.get("cpus") and r["device"] == r0["device"] and not r["peak_device_mib"]:
            n = r["threads"]
            where = f", CPUs {format_cpulist(r['cpus'])} ({n} thread{'s' if n != 1 else ''})"
        print(f"rank {r['rank']}: ready in {r['ready_s']:.2f} s, {mem}{shard}{where}")
    if r0["matches_unsharded"] is not None:
        print("matches unsharded model: " + ("yes" if r0["matches_unsharded"] else "NO"))
        return 0 if r0["matches_unsharded"] else 1
    return 0


def _token_ids(prompt: str) -> bool:
    """Whether ``prompt`` is space-separated token ids (ASCII digits only: ``int`` refuses
    other digits such as "²")."""
    parts = prompt.split()
    return bool(parts) and all(p.isascii() and p.isdigit() for p in parts)


def _check_prompt(prompt: str, model: str) -> None:
    """A text prompt needs a tokenizer saved with MODEL; checked once, before any rank."""
    from pathlib import Path

    from ..errors import ArgumentError

    if _token_ids(prompt):
        return
    folder = Path(model)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                "tokenizer.model")):
        raise ArgumentError(
            f"--prompt {prompt!r} is text, but {model} has no tokenizer (tokenizer.json or "
            "tokenizer_config.json in its folder); give token ids, e.g. --prompt '1 2 3'")


def run(args) -> int:
    from ..errors import XtpError
    from ..models.builtin import resolve_config
    from .launch import check_environment
    from .placement import hint, local_placement, resolve_tp

    check_environment()  # a bad XTP_* value or accelerator choice: one error, before anything
    args.tp, why = resolve_tp(args.tp, args.model)
    if args.tp < 1:
        raise XtpError(f"--tp must be >= 1, got {args.tp}")
    if args.max_new_tokens < 1:
        raise XtpError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    resolve_config(args.model)  # a wrong MODEL fails here, once, before any rank starts
    _check_prompt(args.prompt, args.model)
    params = (args.model, args.tp, args.prompt, args.max_new_tokens, args.dtype, not args.no_check,
              args.eager)
    from .launch import run_on_ranks

    apply_pack_option(args)
    if "RANK" not in os.environ:  # under torchrun every rank would print it
        for line in (why, hint(args.tp)):
            if line:
                print(line, flush=True)
        placement = local_placement(args.tp)
        if placement is not None:
            print(f"placement: {placement.note}", flush=True)
    results = run_on_ranks(rank_main, params, args.tp, "xtp-run")
    return 0 if results is None else _report(results, args)
