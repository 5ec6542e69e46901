"""One rank of ``xtp bench``: load one implementation, time prefill and decode, write JSON.

``xtp bench`` starts this file as a script under ``torchrun`` (``python -m
torch.distributed.run``), with the interpreter the peers live in (``--python``). It imports
neither ``xtp`` nor a peer at module level, so a peer's rank needs only that peer installed.

Implementations (``--impl``):

* ``xtp``: ``xtp.from_pretrained(path)`` (each rank reads its slices), or, on an xtp without
  it, ``transformers`` ``from_pretrained`` + ``xtp.shard``; then ``xtp.pack_for_inference``
  (counted in the time to ready; ``XTP_CPU_PACK=0``, i.e. ``xtp bench --vs xtp-dense``, skips it);
* ``unsharded``: ``transformers`` ``AutoModelForCausalLM.from_pretrained(path)``, one process;
* ``transformers``: ``from_pretrained(path, tp_plan="auto")`` (transformers' own TP);
* ``deepspeed``: ``from_pretrained`` on every rank, then ``deepspeed.init_inference(model,
  tensor_parallel={"tp_size": N}, dtype=..., replace_with_kernel_inject=False)`` (AutoTP).

Measured on every rank: ``ready_s`` (from this process's start, as the kernel records it,
to the model being loaded and sharded on every rank), ``load_s`` (the loading call alone),
prefill latency (batch 1 x P tokens with the KV cache, median of ``--repeats`` after one
warm-up), per-token decode latency (median over ``--decode-steps`` single-token steps with the
KV cache, after ``--warmup`` steps), peak RSS (``VmHWM``) and RSS after ``import torch``,
peak device memory where there is a device, and with ``--bandwidth`` (CPU) this rank's memory
read bandwidth while all ranks of the run read at once (:func:`read_bandwidth`; after the peak
RSS is taken, so its buffer is not counted). With ``--profile``, another ``--decode-steps``
steps run under ``torch.profiler`` after the timed ones (and xtp's collectives are timed by a
wrapping communicator, which is only installed then).
"""

from __future__ import annotations

import time

T0 = time.time()

import os  # noqa: E402
import sys  # noqa: E402

# run as a script, this file's folder (xtp/) heads sys.path: drop it, or xtp's own modules
# (load.py, plan.py, ...) would shadow top-level names
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import traceback  # noqa: E402

IMPLS = ("xtp", "unsharded", "transformers", "deepspeed")


def process_start() -> float:
    """Epoch seconds at which the kernel started this process (``T0`` where /proc is absent)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return T0


def mem_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB (0 where unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _device(torch):
    """This rank's device: the accelerator of ``LOCAL_RANK`` when torch has one, else CPU."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        kind = acc.current_accelerator().type
        return torch.device(kind, int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


COLLECTIVES: dict[str, list[float]] = {}  # op -> [calls, seconds], filled by TimedComm


def timed_communicator(base):
    """``base`` (an xtp Communicator) with each collective timed into :data:`COLLECTIVES` and
    marked for the profiler as ``xtp::<op>``."""
    import torch

    from xtp.accelerators import Communicator

    class TimedComm(Communicator):
        def __init__(self) -> None:
            self.group = base.group

        world_size = property(lambda self: base.world_size)
        rank = property(lambda self: base.rank)

        def _timed(self, op: str, *args):
            with torch.profiler.record_function(f"xtp::{op}"):
                t = time.perf_counter()
                out = getattr(base, op)(*args)
                entry = COLLECTIVES.setdefault(op, [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - t
            return out

        def all_reduce(self, tensor):
            return self._timed("all_reduce", tensor)

        def all_gather(self, tensor, dim=-1, sizes=None):
            return self._timed("all_gather", tensor, dim, sizes)

        def broadcast(self, tensor, src=0):
            return self._timed("broadcast", tensor, src)

        def barrier(self):
            return base.barrier()

    return TimedComm()


def load(impl: str, path: str, tp: int, dtype, device, profile: bool = False):
    """The model of ``impl``, ready for inference on this rank."""
    import transformers

    auto = transformers.AutoModelForCausalLM
    if impl == "xtp":
        import xtp

        comm = timed_communicator if profile else None
        if hasattr(xtp, "from_pretrained"):
            model = xtp.from_pretrained(path, tp_size=tp, dtype=dtype, progress=False,
                                        communicator=comm)
        else:
            model = xtp.shard(auto.from_pretrained(path, dtype=dtype).eval(), tp_size=tp,
                              communicator=comm)
        if hasattr(xtp, "pack_for_inference"):  # XTP_CPU_PACK=0 (bench --no-pack): a no-op
            xtp.pack_for_inference(model)
        return model
    if impl == "unsharded":
        return auto.from_pretrained(path, dtype=dtype).to(device).eval()
    if impl == "transformers":
        return auto.from_pretrained(path, dtype=dtype, tp_plan="auto").eval()
    if impl == "deepspeed":
        import deepspeed

        model = auto.from_pretrained(path, dtype=dtype).eval()
        engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp}, dtype=dtype,
                                          replace_with_kernel_inject=False)
        return engine.module.eval()
    raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(IMPLS)}")


def barrier(what: str) -> None:
    """A barrier over the world; with xtp installed, through its guarded path, so a rank that
    died or hangs is named (``CollectiveError`` / ``CollectiveTimeoutError``, within
    ``XTP_TIMEOUT``); a peer's rank without xtp gets torch's own error."""
    import torch.distributed as dist

    try:
        from xtp.accelerators.comm.failures import guarded
    except ImportError:  # a peer's rank: only that peer need be installed
        dist.barrier()
        return
    with guarded(what):
        dist.barrier()


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """This rank's share of the memory read bandwidth while every rank of the run reads at
    once, in bytes/s: ``sum()`` over a ``mib`` MiB float32 tensor (larger than any cache) with
    the rank's threads, timed from a barrier before the read to a barrier after it, so each
    rank's time is the time until the slowest rank is done (ranks that do not overlap make the
    figure lower, not higher); the median of ``repeats``. The ranks' figures add up to the
    run's bandwidth. Measured in the same processes right after the decode steps, so it sees
    the same machine (neighbours included) as the figures it is set against."""
    import torch

    dist = torch.distributed
    together = dist.is_available() and dist.is_initialized()
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    times = []
    for i in range(repeats + 1):  # the first read is a warm-up
        if together:
            barrier("the barrier before a bandwidth read")
        t = time.perf_counter()
        x.sum()
        if together:
            barrier("the barrier after a bandwidth read")
        if i:
            times.append(time.perf_counter() - t)
    return x.numel() * x.element_size() / statistics.median(times)


def compiled_decoder(model, key: str, ids, steps: int):
    """``(prefill output, step)`` for compiled decode: an eager prefill of ``ids`` into
    transformers' ``StaticCache`` (room for them and ``steps`` more tokens; the output holds
    the cache under the model's cache keyword), and ``step(tokens, cache)``:
    one decode step through ``torch.compile(model, dynamic=False)`` with explicit positions
    (one graph for every step: no Python int changes between steps)."""
    import torch
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 4)
    res = model(input_ids=ids, use_cache=True, **{key: cache})
    compiled = torch.compile(model, dynamic=False)
    pos = [ids.shape[1]]

    def step(tokens, cache):
        where = torch.full((tokens.shape[0], 1), pos[0], dtype=torch.long, device=tokens.device)
        pos[0] += 1
        return compiled(input_ids=tokens, use_cache=True, position_ids=where, **{key: cache})
    return res, step


def measure(model, vocab: int, device, prefill_tokens: int, repeats: int, decode_steps: int,
            warmup: int, profile: bool, batch: int = 1, decode: str = "eager") -> dict:
    """Prefill (``batch`` x ``prefill_tokens`` tokens) and decode (``batch`` sequences, one
    token each per step) timings in milliseconds, and the greedy decode tokens (per step: the
    token, or with ``batch`` > 1 the list of every sequence's token). ``decode="compiled"``
    decodes through :func:`compiled_decoder` (static cache, ``torch.compile``); its first
    ``warmup`` steps (which compile) are timed as ``compile_s``."""
    import torch

    sync = (lambda: torch.accelerator.synchronize()) if device.type != "cpu" else (lambda: None)
    ids = torch.randint(0, vocab, (batch, prefill_tokens),
                        generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    out: dict = {}
    with torch.no_grad():
        prefill = []
        for _ in range(repeats + 1):
            sync()
            t = time.perf_counter()
            model(input_ids=ids, use_cache=True)
            sync()
            prefill.append((time.perf_counter() - t) * 1e3)
        out["prefill_ms"] = statistics.median(prefill[1:])
        # transformers >= 5.2x names the KV cache ``cache``; older releases ``past_key_values``
        key = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"
        forward = lambda tokens, cache: model(input_ids=tokens, use_cache=True,  # noqa: E731
                                              **{key: cache})
        if decode == "compiled":
            res, forward = compiled_decoder(model, key, ids, warmup + 2 * decode_steps)
        else:
            res = model(input_ids=ids, use_cache=True)
        state = [res[key], res.logits[:, -1:].argmax(-1)]

        def step() -> int:
            res = forward(state[1], state[0])
            state[:] = [res[key], res.logits[:, -1:].argmax(-1)]
            return int(state[1]) if batch == 1 else state[1].view(-1).tolist()

        steps, tokens = [], []
        for _ in range(warmup + decode_steps):
            sync()
            t = time.perf_counter()
            tokens.append(step())
            sync()
            steps.append((time.perf_counter() - t) * 1e3)
        if profile:  # separate, untimed steps: the profiler's overhead stays out of decode_ms
            COLLECTIVES.clear()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(decode_steps):
                    step()
            out["profile"] = profile_summary(prof, decode_steps)
            out["collectives"] = {op: {"calls_per_token": n / decode_steps,
                                       "ms_per_token": sec * 1e3 / decode_steps}
                                  for op, (n, sec) in COLLECTIVES.items()}
    if decode == "compiled":
        out["compile_s"] = sum(steps[:warmup]) / 1e3
    out["decode_ms"] = statistics.median(steps[warmup:])
    out["decode_ms_all"] = steps[warmup:]
    out["tokens"] = tokens[warmup:warmup + 8]
    return out


def profile_summary(prof, steps: int, top: int = 10) -> list[dict]:
    """The ``top`` operators by self CPU time, in milliseconds per decode step."""
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "ms_per_token": e.self_cpu_time_total / 1e3 / steps,
             "calls_per_token": e.count / steps} for e in rows[:top]]


def _versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in ("torch", "transformers", "deepspeed", "xtp"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def pin(cpulist: str) -> str:
    """Restrict every thread of this process to ``cpulist`` (the kernel's list format,
    ``0-3,8``); returns it. Plain Python: a peer's rank has no xtp to import."""
    cpus = set()
    for part in cpulist.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    return cpulist


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one rank of xtp bench (started by xtp bench)")
    p.add_argument("path")
    p.add_argument("--impl", required=True, choices=IMPLS)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--decode", choices=("eager", "compiled"),
                   default=os.environ.get("XTP_BENCH_DECODE", "eager"),
                   help="decode eagerly (dynamic KV cache) or compiled (static cache); "
                   "default: $XTP_BENCH_DECODE, else eager")
    p.add_argument("--bandwidth", action="store_true",
                   help="measure memory read bandwidth after the run (CPU only)")
    p.add_argument("--out", required=True, help="folder for rank{RANK}.json")
    p.add_argument("--cpus", default=None,
                   help="'/'-separated CPU lists, one per local rank (e.g. 0-3/4-7): pin this "
                   "rank to its list before torch starts any thread")
    a = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    result: dict = {"rank": rank, "impl": a.impl, "tp": a.tp, "dtype": a.dtype, "ok": False}
    try:
        if a.cpus:
            result["cpus"] = pin(a.cpus.split("/")[int(os.environ.get("LOCAL_RANK", "0"))])
        import torch

        result["base_rss_mib"] = mem_kib("VmRSS") / 1024
        torch.set_num_threads(a.threads)
        dtype = getattr(torch, a.dtype)
        device = _device(torch)
        t = time.time()
        model = load(a.impl, a.path, a.tp, dtype, device, a.profile)
        if torch.distributed.is_initialized():
            barrier("the barrier after loading (every rank holds its model)")
        result.update(load_s=time.time() - t, ready_s=time.time() - process_start(),
                      threads=torch.get_num_threads(), device=str(device))
        vocab = model.config.get_text_config().vocab_size
        result.update(measure(model, vocab, device, a.prefill_tokens, a.repeats,
                              a.decode_steps, a.warmup, a.profile, a.batch, a.decode))
        result["decode"] = a.decode
        result["peak_rss_mib"] = mem_kib("VmHWM") / 1024
        if device.type != "cpu":
            mod = torch.get_device_module(device.type)
            result["peak_device_mib"] = mod.max_memory_allocated(device) / 2**20
        elif a.bandwidth:
            result["read_bytes_per_s"] = read_bandwidth()
        result.update(ok=True, versions=_versions())
    except Exception as exc:  # noqa: BLE001 - the driver prints it in the table
        result.update(error=f"{type(exc).__name__}: {exc}"[:600],
                      peak_rss_mib=mem_kib("VmHWM") / 1024)
        traceback.print_exc()
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
