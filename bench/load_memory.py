"""Time to ready and peak memory per rank when loading a checkpoint for tensor parallelism.

Loaders compared, each in fresh processes (one per rank, torchrun-style environment):

* ``xtp``: ``xtp.from_pretrained(dir, tp_size=N)`` (each rank reads its slices only);
* ``xtp-presharded``: the same from a folder written by ``xtp preshard`` (one file per rank);
* ``deepspeed``: ``transformers`` ``from_pretrained`` on every rank, then
  ``deepspeed.init_inference(tensor_parallel={"tp_size": N})`` (``DS_ACCELERATOR=cpu``);
* ``transformers``: ``from_pretrained(dir, tp_plan="auto")``.

A loader whose package is missing or that fails is reported as such, with its error.

Usage::

    python bench/load_memory.py make  /tmp/llama-1b --preset 1b      # random weights, streamed
    python bench/load_memory.py run   /tmp/llama-1b --tp 2 --loaders xtp deepspeed transformers
    python bench/load_memory.py run   /tmp/llama-1b --tp 2 --write bench/RESULTS.md
    python bench/load_memory.py make  /tmp/llama-150m --preset 150m --dtype float32
    python bench/load_memory.py run   /tmp/llama-150m --tp 3 --loaders xtp

Per rank: ``base``: resident memory after ``import torch``; ``peak``: the process's peak
resident set (VmHWM: anonymous *and* file-backed pages, so memory-mapped checkpoint pages
count); ``shard``: the bytes of the tensors the rank holds once loaded; ``ready``: seconds from
process start until the model is loaded and sharded on every rank (imports included);
``load``: seconds in the loading call; ``model code``: resident memory once the model's
config and modelling classes are imported (transformers' own import cost, paid by every loader
that builds a transformers model). The goal column checks ``growth <= 1.1 x shard + 48 MiB``
(issue 19), from ``base`` and from ``model code``.
"""

from __future__ import annotations

import time

T0 = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

PRESETS = {  # Llama-style shapes
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=True),
    "300m": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                 tie_word_embeddings=False),
    "150m": dict(hidden_size=1024, intermediate_size=2688, num_hidden_layers=8,
                 num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                 tie_word_embeddings=False),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                 num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                 tie_word_embeddings=False),
}
LOADERS = ("xtp", "xtp-presharded", "deepspeed", "transformers")


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# -- making a checkpoint -----------------------------------------------------------------------
def make(folder: Path, preset: str, dtype_name: str) -> None:
    """Random Llama weights written tensor by tensor (the writer never holds the model)."""
    import torch
    import transformers

    from xtp.formats.safetensors_io import StreamWriter
    from xtp.loading.api import skeleton

    dtype = getattr(torch, dtype_name)
    config = transformers.LlamaConfig(**PRESETS[preset], max_position_embeddings=4096)
    config.architectures = ["LlamaForCausalLM"]
    model = skeleton(config, transformers.LlamaForCausalLM, dtype)
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    items = [(k, v.dtype, tuple(v.shape)) for k, v in model.state_dict().items() if k not in tied]
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    w = StreamWriter(folder / "model.safetensors", items, {"format": "pt"})
    for name, dt, shape in items:
        t = torch.ones(shape, dtype=dt) if name.endswith("norm.weight") else (
            torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(dt)
        w.write(name, t)
    w.close()
    config.dtype = dtype
    config.save_pretrained(str(folder))
    n = sum(torch.Size(s).numel() for _, _, s in items)
    print(f"wrote {folder}: {n / 1e9:.2f} B parameters, {n * dtype.itemsize / 2**30:.2f} GiB")


# -- one rank -----------------------------------------------------------------------------------
def rank_main(args) -> None:
    import torch

    base = rss_kib("VmRSS")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.tp))
    result = {"rank": int(os.environ["RANK"]), "base_kib": base}
    try:
        import transformers  # noqa: F401 - every loader needs it; measured separately

        if args.loader.startswith("xtp"):
            import xtp  # noqa: F401
        result["imports_kib"] = rss_kib("VmRSS")
        # the model's config and modelling code: transformers imports them for any loader
        # (LlamaConfig alone pulls torch.distributed.tensor and sympy); counted apart from
        # what loading itself costs
        cfg = transformers.AutoConfig.from_pretrained(args.folder)
        getattr(transformers, (cfg.architectures or ["AutoModelForCausalLM"])[0])
        result["model_code_kib"] = rss_kib("VmRSS")
        start = time.time()
        model = load(args.loader, args.folder, args.tp, args.dtype)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
        result.update(load_s=time.time() - start, ready_s=time.time() - T0,
                      peak_kib=rss_kib("VmHWM"), rss_kib=rss_kib("VmRSS"), ok=True,
                      shard_kib=shard_bytes(model) / 1024)
        with torch.no_grad():
            ids = torch.arange(8).unsqueeze(0)
            logits = model(ids).logits
        result["logits_sum"] = float(logits.float().sum())
    except Exception as exc:  # noqa: BLE001 - reported in the table
        result.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}",
                      peak_kib=rss_kib("VmHWM"))
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


def shard_bytes(model) -> int:
    """Bytes of the tensors this rank holds (parameters and buffers, each storage once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def load(loader: str, folder: str, tp: int, dtype: str | None = None):
    import torch

    if loader in ("xtp", "xtp-presharded"):
        import xtp

        return xtp.from_pretrained(folder, tp_size=tp, progress=False, dtype=dtype)
    if loader == "deepspeed":
        import deepspeed
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp},
                                          dtype=model.dtype, replace_with_kernel_inject=False)
        return engine.module
    if loader == "transformers":
        import transformers

        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        return transformers.AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto")
    raise ValueError(loader)


# -- driver -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_loader(loader: str, folder: Path, tp: int, out: Path, timeout: float,
               dtype: str | None = None) -> list[dict]:
    out.unlink(missing_ok=True)
    port = free_port()
    procs = []
    for r in range(tp):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(tp), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(tp), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // tp)))
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "_rank", str(folder), "--loader", loader, "--tp", str(tp),
             "--out", str(out)] + (["--dtype", dtype] if dtype else []),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    errors = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            errors.append("timeout")
        if p.returncode:
            errors.append(err.decode(errors="replace")[-400:])
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if len(rows) < tp:
        rows.append({"rank": -1, "ok": False, "error": " | ".join(errors)[-400:] or "no result"})
    return sorted(rows, key=lambda r: r["rank"])


def model_bytes(folder: Path) -> int:
    from xtp.formats.checkpoint_index import CheckpointIndex

    with CheckpointIndex.open(folder) as ck:
        return sum(ck.info(k).nbytes for k in ck.keys())


def table(results: dict[str, list[dict]], folder: Path, tp: int, nbytes: int) -> str:
    mib = 1024
    lines = [f"model: {folder.name}, {nbytes / 2**30:.2f} GiB of weights, tp={tp}, host: "
             f"{platform.node()} ({os.cpu_count()} CPUs), python {platform.python_version()}",
             "", "| loader | rank | ready (s) | load (s) | base (MiB) | + imports (MiB) "
             "| + model code (MiB) | peak (MiB) | shard (MiB) | growth = peak - base (MiB) "
             "| growth / shard | peak - model code (MiB) | goal: growth <= 1.1 x shard + 48 MiB: "
             "from base / from model code |", "|" + "---|" * 13]
    for loader, rows in results.items():
        for r in rows:
            if not r.get("ok"):
                lines.append(f"| {loader} | {r['rank']} | failed: {r.get('error', '?')[:120]} "
                             "| | | | | | | | | | |")
                continue
            extra = (r["peak_kib"] - r["base_kib"]) / mib
            shard = r["shard_kib"] / mib
            loading = (r["peak_kib"] - r["model_code_kib"]) / mib
            budget = 1.1 * shard + 48
            lines.append(f"| {loader} | {r['rank']} | {r['ready_s']:.1f} | {r['load_s']:.1f} | "
                         f"{r['base_kib'] / mib:.0f} | {r['imports_kib'] / mib:.0f} | "
                         f"{r['model_code_kib'] / mib:.0f} | "
                         f"{r['peak_kib'] / mib:.0f} | {shard:.0f} | {extra:.0f} | "
                         f"{extra / shard:.2f} | {loading:.0f} | "
                         f"{'yes' if extra <= budget else 'no'} / "
                         f"{'yes' if loading <= budget else 'no'} (<= {budget:.0f}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("folder", type=Path)
    m.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    m.add_argument("--dtype", default="bfloat16")
    r = sub.add_parser("run")
    r.add_argument("folder", type=Path)
    r.add_argument("--tp", type=int, default=2)
    r.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    r.add_argument("--timeout", type=float, default=1800)
    r.add_argument("--dtype", help="xtp loaders: load in this dtype (e.g. bfloat16)")
    r.add_argument("--write", type=Path, help="append the table to this markdown file")
    w = sub.add_parser("_rank")
    w.add_argument("folder")
    w.add_argument("--loader", required=True)
    w.add_argument("--tp", type=int, required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--dtype")
    args = p.parse_args()
    if args.cmd == "make":
        return make(args.folder, args.preset, args.dtype)
    if args.cmd == "_rank":
        return rank_main(args)
    results = {}
    for loader in args.loaders:
        folder = args.folder
        if loader == "xtp-presharded":
            folder = args.folder.parent / f"{args.folder.name}-xtp-tp{args.tp}"
            if not folder.exists():
                from xtp.loading.offline import preshard

                preshard(args.folder, folder, args.tp, progress=False)
        results[loader] = run_loader(loader, folder, args.tp,
                                     Path(f"/tmp/xtp-bench-{os.getpid()}-{loader}.jsonl"),
                                     args.timeout, args.dtype)
        print(f"{loader}: done", file=sys.stderr)
    text = table(results, args.folder, args.tp, model_bytes(args.folder))
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d')}: bench/load_memory.py run "
                    f"{args.folder.name} --tp {args.tp}\n\n{text}\n")


if __name__ == "__main__":
    main()
