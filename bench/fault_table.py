"""Time to fail on every collective path when a peer is killed or hangs: the fault table.

For each phase of ``tests/helpers/reliability_worker.py``'s ``phase_worker`` (shard, load,
forward, the three barriers of save_sharded, the data-parallel gradient all-reduce,
save_training_state, resume, a packed model's forward, xtp bench's barrier), each
communicator (``gloo``: ``XTP_CPU_SHM=0``; ``shm``: the CPU's shared-memory communicator, the
default) and each way to fail (``killed``: SIGKILL; ``hung``: alive, never reaches the
collective), two ranks on this machine, rank 1 the victim: what rank 0 raised, whether it
names rank 1 by pid, and the seconds from entering the step to the error. ``XTP_TIMEOUT`` is
3 s for a hang and 60 s for a kill (a kill must be found by its pid, not by the timeout).

Usage::

    python bench/fault_table.py                       # every phase, both communicators
    python bench/fault_table.py --phases dp save-agree --write bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "helpers")]

PHASES = ("shard", "load", "forward", "save-agree", "save-write", "save-finish", "dp",
          "train-save", "resume", "pack", "bench")
ENVS = {("gloo", "kill"): {"XTP_TIMEOUT": "60", "XTP_CPU_SHM": "0"},
        ("gloo", "hang"): {"XTP_TIMEOUT": "3", "XTP_CPU_SHM": "0"},
        ("shm", "kill"): {"XTP_TIMEOUT": "60"},
        ("shm", "hang"): {"XTP_TIMEOUT": "3"}}


def one(phase: str, comm: str, how: str) -> str:
    from reliability_worker import phase_worker, run_world, tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        if phase == "load":
            tiny_model().save_pretrained(folder)
        results, codes, pids = run_world(phase_worker, 2, (phase, 1, how, str(folder)),
                                         ENVS[comm, how])
    ok, got = results.get(0, (False, "no report (hung?)"))
    if not ok:  # e.g. the rendezvous timed out on an overloaded machine: not this path's answer
        last = str(got).strip().splitlines()[-1][:120]
        return f"| {phase} | {comm} | {how} | - | rank 0 failed before the step: {last} | |"
    if got.get("type") is None:
        return f"| {phase} | {comm} | {how} | - | NO ERROR raised | NO |"
    named = "rank 1 " in got["message"] and f"pid {pids[1]}" in got["message"]
    return (f"| {phase} | {comm} | {how}ed | {got['elapsed']:.2f} | {got['type']} | "
            f"{'yes' if named else 'NO'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    p.add_argument("--comms", nargs="+", default=["gloo", "shm"], choices=["gloo", "shm"])
    p.add_argument("--write", type=Path, help="append the table to this markdown file")
    a = p.parse_args()
    os.chdir(ROOT)
    lines = ["| path | communicator | peer | time to fail (s) | rank 0 raised | names rank 1 "
             "and its pid |", "|---|---|---|---|---|---|"]
    for phase in a.phases:
        for comm in a.comms:
            for how in ("kill", "hang"):
                lines.append(one(phase, comm, how).replace("hanged", "hung"))
                print(lines[-1], flush=True)
    head = (f"host {platform.node()} ({os.cpu_count()} CPUs), python "
            f"{platform.python_version()}, 2 ranks, "
            f"command: python bench/fault_table.py {' '.join(sys.argv[1:])}".strip())
    text = head + "\n\n" + "\n".join(lines)
    print(text)
    if a.write:
        with open(a.write, "a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d')}: fault table (bench/fault_table.py)\n\n"
                    f"{text}\n")


if __name__ == "__main__":
    main()
