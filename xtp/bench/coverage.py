"""The sweep behind ``xtp coverage``: every LM model type of the installed transformers, tiny,
sharded at each tp size over real local CPU ranks and compared with the unsharded model.

For each tp size the ranks (:mod:`xtp.bench.coverage_rank`) are started once and loop over all
types. This process watches their per-rank JSON lines: a type that takes longer than
``timeout_s`` (a hang) or a rank that dies (a crash) costs that type only: it is recorded as
``error`` with the reason, the ranks are stopped and started again on the remaining types.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from .coverage_report import verdict

KINDS = ("seq2seq", "causal", "masked")  # a type in several mappings is checked as the first


def model_types(kinds: Sequence[str] = KINDS, only: Sequence[str] | None = None
                ) -> list[tuple[str, str]]:
    """``(model_type, kind)`` of every type in the installed transformers' auto mappings of the
    given kinds (``causal``, ``masked``, ``seq2seq``), sorted; ``only`` keeps those types."""
    from transformers.models.auto import modeling_auto as auto

    mappings = {"causal": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                "masked": auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                "seq2seq": auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES}
    found: dict[str, str] = {}
    for kind in KINDS:
        if kind in kinds:
            for name in mappings[kind]:
                found.setdefault(name, kind)
    if only is not None:
        found = {name: found[name] for name in only if name in found}
    return sorted(found.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(types: list, tp: int, work: str, timeout_s: float, attempt: int) -> list:
    out_dir = os.path.join(work, f"tp{tp}-{attempt}")
    os.makedirs(out_dir)
    job = os.path.join(out_dir, "job.json")
    with open(job, "w") as f:
        json.dump({"types": types, "tp": tp, "out_dir": out_dir, "timeout_s": timeout_s}, f)
    port = _free_port()
    procs = []
    for rank in range(tp):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(tp), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "xtp.bench.coverage_rank", job],
                                       env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log, out_dir, rank))
    return procs


def _stop(procs: list) -> None:
    for proc, log, _, _ in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the rank's own session: it and its children
        proc.wait()
        log.close()


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    lines = open(path).read().splitlines()
    return [json.loads(ln) for ln in lines if ln.endswith("}")]


def _last_log_line(out_dir: str, rank: int) -> str:
    path = os.path.join(out_dir, f"rank{rank}.log")
    lines = [ln.strip() for ln in open(path, errors="replace").read().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def merge(per_rank: list[dict]) -> dict:
    """One result from the ranks' outcomes of a type: the same status on every rank, else an
    error; for ``ran``: the largest error (also per encoder tower, ``tower_rel_err``), all
    tokens equal, the largest share held."""
    statuses = {r["status"] for r in per_rank}
    if len(statuses) > 1:
        said = "; ".join(f"rank {i}: {r['status']} {r.get('reason', '')}".strip()
                         for i, r in enumerate(per_rank))
        return {"status": "error", "reason": f"ranks disagree: {said}"}
    first = per_rank[0]
    if first["status"] != "ran":
        return {"status": first["status"], "reason": first.get("reason", "")}
    return {"status": "ran", "rel_err": max(r["rel_err"] for r in per_rank),
            "tokens_equal": all(r["tokens_equal"] for r in per_rank),
            "max_fraction": max(r["held_bytes"] / r["full_bytes"] for r in per_rank),
            "tokens_via": first["tokens_via"],
            **({"tower_rel_err": {t: max(r["tower_rel_err"][t] for r in per_rank)
                                  for t in first["tower_rel_err"]}}
               if "tower_rel_err" in first else {})}


def sweep_tp(types: list[tuple[str, str]], tp: int, timeout_s: float = 120.0,
             say: Callable[[str], None] = print) -> dict[str, dict]:
    """Every type of ``types`` at ``tp``: ``{model_type: result with its verdict}``."""
    results: dict[str, dict] = {}
    todo = [list(t) for t in types]
    kinds = dict(types)
    with tempfile.TemporaryDirectory(prefix="xtp-coverage-") as work:
        attempt = 0
        while todo:
            procs = _start(todo, tp, work, timeout_s, attempt)
            attempt += 1
            out_dir = procs[0][2]
            seen = 0
            started = time.monotonic()
            failed: dict | None = None
            while True:
                rows = [_read(os.path.join(out_dir, f"rank{r}.jsonl")) for r in range(tp)]
                done = [[x for x in rank_rows if x["event"] == "done"] for rank_rows in rows]
                while seen < min(len(d) for d in done):
                    name = todo[seen][0]
                    result = merge([d[seen] for d in done])
                    result["seconds"] = max(d[seen]["seconds"] for d in done)
                    _record(results, name, kinds[name], tp, result, say, len(types))
                    seen += 1
                    started = time.monotonic()
                if seen == len(todo):
                    break
                dead = [(p, r) for p, _, _, r in procs if p.poll() is not None]
                if dead:
                    time.sleep(0.5)  # let the others' lines land before judging
                    if any(p.returncode != 0 for p, _ in dead) or len(dead) == tp:
                        bad = [(p, r) for p, r in dead if p.returncode != 0] or dead
                        failed = {"status": "error", "reason": "; ".join(
                            f"rank {r} exited with {p.returncode}: "
                            f"{_last_log_line(out_dir, r)}" for p, r in bad)}
                        break
                if time.monotonic() - started > timeout_s:
                    said = "; ".join(f"rank {r}: {d[seen]['status']} {d[seen].get('reason', '')}"
                                     .strip() for r, d in enumerate(done) if len(d) > seen)
                    failed = {"status": "error", "reason": f"no result after {timeout_s:.0f} s "
                              "(a hang, or the ranks waiting on each other); ranks stopped"
                              + (f"; before that {said}" if said else "")}
                    break
                time.sleep(0.1)
            _stop(procs)
            if failed is not None:
                name = todo[seen][0]
                failed["seconds"] = round(time.monotonic() - started, 2)
                _record(results, name, kinds[name], tp, failed, say, len(types))
                seen += 1
            todo = todo[seen:]
    return results


def _record(results, name, kind, tp, result, say, total) -> None:
    from .coverage_report import describe

    result["verdict"] = verdict(result, tp)
    results[name] = dict(result, kind=kind)
    say(f"[{len(results):>3}/{total}] tp {tp} {name:<28} {describe(result)} "
        f"({result.get('seconds', 0):.1f} s)")


def sweep(types: list[tuple[str, str]], tps: Sequence[int], timeout_s: float = 120.0,
          say: Callable[[str], None] = print) -> dict:
    """The results document: versions, date, tp sizes, per type its kind and per tp its
    result and verdict (``xtp coverage --out`` writes it as JSON)."""
    import torch
    import transformers

    from .._version import __version__

    start = time.monotonic()
    doc: dict = {"transformers": transformers.__version__, "torch": torch.__version__,
                 "xtp": __version__, "date": datetime.date.today().isoformat(),
                 "tps": list(tps), "timeout_s": timeout_s, "types": {}}
    for tp in tps:
        for name, result in sweep_tp(types, tp, timeout_s, say).items():
            entry = doc["types"].setdefault(name, {"kind": result.pop("kind"), "tp": {}})
            result.pop("kind", None)
            entry["tp"][str(tp)] = result
    doc["wall_s"] = round(time.monotonic() - start, 1)
    return doc
