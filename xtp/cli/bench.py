"""``xtp bench MODEL --tp 1,2 [--vs deepspeed,transformers]``: xtp against its peers.

For each dtype, implementation and TP size, a fresh set of ranks (``torchrun``, the
interpreter of ``--python``) loads the model and measures time to ready, prefill latency and
per-token decode latency and peak memory (:mod:`xtp.bench.rank`). ``unsharded`` (one process,
plain transformers) always runs at tp 1. A peer that the ranks' interpreter cannot import is
skipped with a message. Built-in names and config JSONs are first saved once with seeded
random weights to ``--cache-dir``. The table gives each metric also as a ratio to xtp at the
same tp and dtype, and next to each decode figure the memory-bandwidth floor: weight bytes one
decode step reads / the memory read bandwidth the same ranks measure right after their decode
steps, all reading at once (a shared machine's bandwidth moves with its neighbours, so it is
measured in every run, not once).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..accelerators.cpu.cpu_topology import format_cpulist, parse_cpulist
from ..bench.variants import VARIANTS
from ..errors import ArgumentError
from .options import add_pack_option, apply_pack_option

PEERS = ("deepspeed", "transformers")
DECODES = ("auto", "eager", "compiled")
PEER_SETUP = "bash bench/setup_peers.sh VENV, then --python VENV/bin/python"
ENV_PYTHON = "XTP_BENCH_PYTHON"


class BenchUsageError(ArgumentError):
    """A bench option that cannot work (unknown implementation, bad list, missing extra)."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="time xtp against DeepSpeed AutoTP and transformers tp_plan",
        description=__doc__.split("\n\n", 1)[1],
        epilog="examples:\n  xtp bench tiny-llama --tp 1,2 --vs none\n"
        "  xtp bench llama-1b --tp 1,2 --vs deepspeed,transformers --dtype float32,bfloat16 \\\n"
        "      --python .venv-peers/bin/python --plot bench.png --json bench.json\n"
        "  xtp bench ./my-checkpoint --tp 2 --decode-steps 64 --profile",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="built-in name, config JSON or checkpoint folder")
    p.add_argument("--tp", default="1,2",
                   help="comma-separated TP sizes, auto among them: the size xtp run --tp auto "
                   "chooses from the host's topology (default 1,2)")
    p.add_argument("--vs", default=",".join(PEERS),
                   help=f"peers to compare, comma-separated, or 'none' (default {','.join(PEERS)}"
                   "); also xtp-dense: xtp with its weights left unpacked (--no-pack); "
                   "xtp-onednn: bf16 ranks of several threads on oneDNN, not the GEMV kernel; "
                   "xtp-compiled, deepspeed-compiled, unsharded-compiled: decode through "
                   "torch.compile over a static KV cache; xtp-eager: eager decode; "
                   "xtp-kernel-team, -pool, -solo: the GEMV kernel on every thread count; "
                   "xtp-kernel-rows(4): bf16 as plain rows for the kernel (see XTP_CPU_* in "
                   "xtp env)")
    p.add_argument("--dtype", default="float32", help="comma-separated dtypes (default float32)")
    p.add_argument("--python", default=None,
                   help=f"interpreter for all ranks (default ${ENV_PYTHON}, else this one); "
                   f"for the peers: {PEER_SETUP}")
    p.add_argument("--prefill-tokens", type=int, default=128, help="prompt length (default 128)")
    p.add_argument("--batch", type=int, default=1,
                   help="sequences decoded at once (default 1): prefill is batch x "
                   "--prefill-tokens tokens, each decode step batch tokens")
    p.add_argument("--decode-steps", type=int, default=32,
                   help="decode steps timed, median reported (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="prefill repeats (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps (default 2)")
    p.add_argument("--decode", choices=DECODES, default="auto",
                   help="how every implementation decodes: eager (dynamic KV cache), compiled "
                   "(torch.compile over a static KV cache; the warm-up steps, which compile, "
                   "are timed apart), or auto (default): compiled where the accelerator "
                   "decodes faster so (CUDA: CUDA graphs), else eager (the CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per rank (default: the physical cores each rank is pinned to; "
                   "with --no-pin available cores // tp)")
    p.add_argument("--no-pin", action="store_true",
                   help="leave the ranks of every implementation unpinned (default on the CPU: "
                   "each local rank on its own physical cores, one thread per core, the same "
                   "cores for every implementation; XTP_PIN=0 does the same)")
    p.add_argument("--cache-dir", default="bench/out",
                   help="where built-in models are saved (default bench/out)")
    p.add_argument("--no-bandwidth", action="store_true",
                   help="skip measuring memory read bandwidth after each run (no decode floor)")
    p.add_argument("--max-load", type=float, default=None,
                   help="before each run wait (60 s steps, up to --load-retries) while the "
                   "1-minute load average exceeds this")
    p.add_argument("--load-retries", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every implementation this many times, alternating the order, and "
                   "report the median of each time (default 1; use 3+ on a shared machine)")
    p.add_argument("--profile", action="store_true",
                   help="profile the decode steps (top operators per token)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run (default 1800)")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--plot", default=None, help="draw the table to this PNG (needs matplotlib)")
    add_pack_option(p)
    p.set_defaults(func=run)


def _split(raw: str, what: str) -> list[str]:
    items = [x.strip() for x in raw.split(",") if x.strip()]
    if not items:
        raise BenchUsageError(f"{what} needs at least one value, e.g. {what} 1,2")
    return items


def _placements(tps: set[int], args) -> dict[int, str | None]:
    """Per TP size, the ``--cpus`` argument of the ranks (``/``-separated CPU lists, one per
    local rank), or ``None`` where they are not pinned."""
    from .placement import local_placement

    if args.no_pin or _has_device():
        return {tp: None for tp in tps}
    out: dict[int, str | None] = {}
    for tp in sorted(tps):
        placement = local_placement(tp)
        out[tp] = None if placement is None or not placement.pinned else "/".join(
            format_cpulist(r.cpus) for r in placement.ranks)
        if placement is not None:
            print(f"placement tp {tp}: {placement.note}", flush=True)
    return out


def _threads(tp: int, override: int | None, cpus: str | None = None) -> int:
    if override:
        return override
    if cpus:
        from ..accelerators.env import num_threads

        return num_threads() or len(parse_cpulist(cpus.split("/")[0]))
    try:
        from ..accelerators.cpu.threads import threads_per_rank

        return threads_per_rank(tp, local_ranks=tp)
    except ImportError:
        return max(1, (os.cpu_count() or 1) // tp)


def _importable(python: str, module: str) -> str | None:
    """None when ``python`` can import ``module``, else why not."""
    code = f"import importlib.util as u, sys; sys.exit(0 if u.find_spec({module!r}) else 3)"
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {python}: {exc}"
    return None if proc.returncode == 0 else f"{module} is not importable by {python}"


def _load_avg() -> str:
    try:
        return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load ?"


def _wait_for_quiet(max_load: float | None, retries: int) -> None:
    for _ in range(retries if max_load is not None else 0):
        if os.getloadavg()[0] <= max_load:
            return
        print(f"  {_load_avg()} > {max_load}: waiting 60 s", flush=True)
        time.sleep(60)


def launch(python: str, impl: str, path: Path, tp: int, dtype: str, threads: int, args,
           cpus: str | None = None) -> list[dict]:
    """Start ``tp`` fresh ranks of ``impl`` under torchrun, pinned to ``cpus`` (the ranks'
    ``/``-separated CPU lists) where given; their result dicts."""
    from ..bench import rank as bench_rank

    out = Path(tempfile.mkdtemp(prefix="xtp-bench-"))
    rank_impl, extra_env = VARIANTS.get(impl, (impl, {}))
    decode = extra_env.get("XTP_BENCH_DECODE") or args.decode
    cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
           bench_rank.__file__, str(path), "--impl", rank_impl, "--tp", str(tp), "--dtype", dtype,
           "--threads", str(threads), "--prefill-tokens", str(args.prefill_tokens),
           "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--decode-steps", str(args.decode_steps),
           "--warmup", str(args.warmup), "--decode", decode, "--out", str(out)] + (
               ["--profile"] if args.profile else []) + (
               ["--cpus", cpus] if cpus else []) + (
               ["--bandwidth"] if not (args.no_bandwidth or _has_device()) else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), LOCAL_SIZE=str(tp),
               PYTHONUNBUFFERED="1", **extra_env)
    if impl == "deepspeed" and not _has_device():
        env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        log += f"\ntimed out after {args.timeout:.0f} s"
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    if len(ranks) < tp or not all(r.get("ok") for r in ranks):
        tail = " | ".join(line for line in log.strip().splitlines()[-3:])
        if not ranks:
            ranks = [{"rank": 0, "impl": impl, "tp": tp, "dtype": dtype, "ok": False}]
        for r in ranks:
            r.setdefault("error", tail[-400:])
            r["ok"] = False
    return ranks


def _has_device() -> bool:
    import torch

    acc = getattr(torch, "accelerator", None)
    return bool(acc is not None and acc.is_available())


def resolve_decode(decode: str) -> tuple[str, str]:
    """``(eager|compiled, why)`` for ``--decode``: ``auto`` is compiled where this process's
    accelerator decodes faster compiled (:attr:`Accelerator.compiled_decode`: CUDA), else
    eager."""
    if decode != "auto":
        return decode, f"decode: {decode} (--decode {decode})"
    from ..accelerators import get_accelerator

    acc = get_accelerator()
    if acc.compiled_decode:
        return "compiled", (f"decode: compiled ({acc.name} decodes faster through "
                            "torch.compile over a static KV cache; --decode eager or --vs "
                            "xtp-eager for the eager path)")
    return "eager", (f"decode: eager ({acc.name}: eager decode is the faster path here; "
                     "--decode compiled or --vs xtp-compiled to measure the compiled one)")


def _check(args) -> tuple[list[int], list[str], list[str]]:
    import torch

    from .placement import AUTO, resolve_tp

    sizes: set[int] = set()
    for item in _split(args.tp, "--tp"):
        if item.lower() == AUTO:
            size, why = resolve_tp(AUTO, args.model)
            print(why, flush=True)
            sizes.add(size)
            continue
        try:
            sizes.add(int(item))
        except ValueError:
            raise BenchUsageError(f"--tp takes comma-separated integers (or auto), e.g. 1,2; "
                                  f"got {args.tp!r}") from None
    tps = sorted(sizes)
    if tps[0] < 1:
        raise BenchUsageError(f"--tp sizes must be >= 1, got {args.tp}")
    dtypes = _split(args.dtype, "--dtype")
    for d in dtypes:
        if not isinstance(getattr(torch, d, None), torch.dtype):
            raise BenchUsageError(f"--dtype {d!r} is not a torch dtype; use float32, bfloat16 "
                                  "or float16")
    vs = [] if args.vs.strip().lower() == "none" else _split(args.vs, "--vs")
    for name in vs:
        if name not in PEERS and name not in VARIANTS:
            raise BenchUsageError(f"--vs {name!r}: unknown implementation; known peers: "
                                  f"{', '.join(PEERS + tuple(VARIANTS))} (or 'none')")
    for name in ("prefill_tokens", "batch", "decode_steps", "repeats", "rounds"):
        if getattr(args, name) < 1:
            raise BenchUsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchUsageError("--plot needs matplotlib: pip install 'xtp[bench]'") from None
    return tps, dtypes, vs


def _versions_line(rows: list[dict], python: str) -> str:
    seen: dict[str, str] = {}
    for r in rows:
        seen.update(r.get("versions") or {})
    return f"ranks' interpreter {python}: " + ", ".join(f"{k} {v}" for k, v in seen.items())


def _one_run(python: str, impl: str, path: Path, tp: int, dtype: str, threads: int,
             per_token: int, args, cpus: str | None = None) -> dict:
    """One fresh set of ranks, waited for a quiet machine; its row, with the load around it."""
    from ..bench.leaks import collect_leaks, shm_files
    from ..bench.report import fold

    _wait_for_quiet(args.max_load, args.load_retries)
    before = _load_avg()
    print(f"  {impl:12s} tp {tp}: {before} ...", end="", flush=True)
    shm_before = shm_files()
    row = fold(launch(python, impl, path, tp, dtype, threads, args, cpus), per_token)
    leaks = collect_leaks(shm_before)
    row.update(load_before=before, load_after=_load_avg(), dtype=dtype, impl=impl, tp=tp,
               threads=row.get("threads") or threads, bytes_per_step=per_token,
               shm_left=leaks)
    if leaks["files"]:
        print(f" [left {leaks['files']} file(s), {leaks['mib']:.0f} MiB, in /dev/shm"
              + (f"; removed: {', '.join(leaks['removed'])}" if leaks["removed"] else "") + "]",
              end="", flush=True)
    bw = row.get("read_bytes_per_s")
    print(f" {row['load_after']}; " + (
        f"ready {row['ready_s']:.1f} s, prefill {row['prefill_ms']:.0f} ms, decode "
        f"{row['decode_ms']:.1f} ms/token" + (
            f", then read {bw / 1e9:.1f} GB/s (all ranks) -> floor {row['floor_ms']:.1f} ms"
            if bw else "") if row["ok"]
        else f"FAILED: {str(row.get('error'))[:300]}"), flush=True)
    return row


def run(args) -> int:
    from ..bench.prep import checkpoint_for, weight_bytes
    from ..bench.report import compile_text, merge_rounds, plot, profile_text, table
    from ..models.builtin import resolve_config
    from .launch import check_environment

    check_environment()  # a bad XTP_* value fails here, not in every run's ranks
    resolve_config(args.model)  # a wrong MODEL fails here, before anything starts
    tps, dtypes, vs = _check(args)
    args.decode, decode_why = resolve_decode(args.decode)
    print(decode_why, flush=True)
    apply_pack_option(args)
    python = args.python or os.environ.get(ENV_PYTHON) or sys.executable
    impls = ["xtp", "unsharded"]
    for peer in vs:
        base = VARIANTS.get(peer, (peer, {}))[0]
        why = None if base in ("xtp", "unsharded") else _importable(python, base)
        if why:
            print(f"{peer}: skipped ({why}; to install the peers: {PEER_SETUP})", flush=True)
        else:
            impls.append(peer)
    cpus = _placements(set(tps) | {1}, args)
    threads = {tp: _threads(tp, args.threads, cpus[tp]) for tp in set(tps) | {1}}
    print(f"model {args.model}; {os.cpu_count()} CPUs; threads per rank: "
          + ", ".join(f"tp {tp} -> {n}" for tp, n in sorted(threads.items())), flush=True)
    rows: list[dict] = []
    for dtype in dtypes:
        path = checkpoint_for(args.model, dtype, Path(args.cache_dir))
        total, per_token = weight_bytes(path, dtype)
        print(f"{dtype}: checkpoint {path}; weights {total / 1e9:.2f} GB, "
              f"{per_token / 1e9:.2f} GB read per decode step", flush=True)
        runs = [(impl, tp) for impl in impls
                for tp in ([1] if VARIANTS.get(impl, (impl,))[0] == "unsharded" else tps)]
        done: dict[tuple[str, int], list[dict]] = {run: [] for run in runs}
        for rnd in range(args.rounds):
            if args.rounds > 1:
                print(f" round {rnd + 1}/{args.rounds}", flush=True)
            for impl, tp in runs if rnd % 2 == 0 else runs[::-1]:  # alternate the order
                done[impl, tp].append(_one_run(python, impl, path, tp, dtype, threads[tp],
                                               per_token, args, cpus[tp]))
        rows += [merge_rounds(done[run]) for run in runs]
    print()
    print(f"ratios: implementation / xtp at the same tp and dtype (above 1: xtp is better); "
          f"prefill: {args.batch} x {args.prefill_tokens} tokens; decode: median of "
          f"{args.decode_steps} steps of {args.batch} token{'s' * (args.batch > 1)}; "
          "floor: weight bytes per step / the read bandwidth "
          "the run's ranks measured after decoding"
          + (f"; times: median of {args.rounds} rounds, ratios: median of the ratios within "
             "each round" if args.rounds > 1 else ""))
    print(table(rows))
    print(_versions_line(rows, python))
    if any(r.get("compile_s") for r in rows):
        print(compile_text(rows))
    if args.profile:
        print(profile_text(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": args.model, "tp": tps, "dtypes": dtypes, "python": python,
             "rows": rows, "argv": sys.argv}, indent=1))
        print(f"results written to {args.json}")
    if args.plot:
        plot(rows, Path(args.plot), f"xtp bench {args.model}")
        print(f"chart written to {args.plot}")
    return 0 if all(r["ok"] for r in rows if r["impl"] in ("xtp", "unsharded")) else 1
