"""Files a benchmark run leaves in ``/dev/shm``: counted for every implementation, and removed
where they are a peer's known leak.

DeepSpeed's CPU all-reduce maps a 66 MiB ``/dev/shm`` file per rank and never unlinks it, so
each DeepSpeed run of ``xtp bench`` would leave tp x 66 MiB of RAM (tmpfs) taken for the rest
of the benchmark and after it (bench/RESULTS.md records how much). The bench removes
those once the run's ranks have exited, and reports what every run left behind (xtp's shared
memory is unlinked as soon as every rank has mapped it, so it leaves nothing).
"""

from __future__ import annotations

from pathlib import Path

SHM_DIR = Path("/dev/shm")
#: name prefix of a peer's leaked file -> what it is (removed after each run)
KNOWN_LEAKS = {"deepspeed_allreduce_buffer_": "DeepSpeed's CPU all-reduce buffers"}


def shm_files(folder: Path = SHM_DIR) -> set[str]:
    """Names of the files in ``folder`` now (empty where it does not exist)."""
    try:
        return {p.name for p in folder.iterdir() if p.is_file()}
    except OSError:
        return set()


def collect_leaks(before: set[str], folder: Path = SHM_DIR) -> dict:
    """The files in ``folder`` that are not in ``before`` (call once the run's ranks have
    exited): ``{"files": n, "mib": size, "removed": what}``, with the peers' known leaks
    (:data:`KNOWN_LEAKS`) deleted and named in ``removed``."""
    left, mib, removed = 0, 0.0, set()
    for name in sorted(shm_files(folder) - before):
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            continue
        left += 1
        mib += size / 2**20
        what = next((w for prefix, w in KNOWN_LEAKS.items() if name.startswith(prefix)), None)
        if what is not None:
            path.unlink(missing_ok=True)
            removed.add(what)
    return {"files": left, "mib": mib, "removed": sorted(removed)}
