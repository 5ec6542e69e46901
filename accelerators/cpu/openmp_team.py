"""torch's own OpenMP threads for xtp's GEMV kernel: the address of ``GOMP_parallel`` in the
OpenMP runtime torch's threads run on.

torch's CPU builds run their intra-op parallel regions on an OpenMP thread team (GNU libgomp,
bundled with the wheels, or Intel's libiomp5, which exports the GNU entry points too). The
kernel, a C extension built without torch headers and without OpenMP, runs a product on that
same team by calling the runtime's ``GOMP_parallel(fn, data, num_threads, flags)`` (what GCC
emits for ``#pragma omp parallel``), at the address found here in a library already loaded:
nothing is loaded that was not. Then the product's threads are the threads torch's ops run on
(and which spin after each of them), not a second set competing for the rank's cores.

A process can hold several copies of a runtime (another package's bundled libgomp, the
system's): each copy has its own threads, and a product run on the wrong copy starts a second
team that spins against torch's. Measured on the 16-core Xeon host (bench/RESULTS.md,
2026-12-03 night): llama-1b bf16 at tp 2 decoded at 518-578 ms/token with 15 busy threads per
8-core rank, against 45-52 with one team. So a runtime is used only when it *is* torch's:
its ``omp_get_max_threads()`` follows ``torch.set_num_threads`` (:func:`follows_torch`).
Candidates, in order: the global symbol scope (where torch's own libraries bind
``GOMP_parallel``: torch loads its runtime with ``RTLD_GLOBAL``), then the runtimes in
``/proc/self/maps``, those in torch's own folder first.

Linux only; where no runtime passes, the kernel's own pool serves
(``accelerators/cpu/csrc/gemv_pool.c``).
"""

from __future__ import annotations

import ctypes
import os
import re

_RUNTIME = re.compile(r"/lib(?:gomp|iomp5)[^/]*\.so[^/]*$")


def loaded_runtimes(maps: str, prefer: str = "") -> list[str]:
    """Paths of OpenMP runtimes in a ``/proc/<pid>/maps`` text, each once, those under
    ``prefer`` (torch's install folder) first."""
    paths: list[str] = []
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[5].strip() if len(line.split(maxsplit=5)) == 6 else ""
        if _RUNTIME.search(path) and path not in paths:
            paths.append(path)
    return sorted(paths, key=lambda p: not (prefer and p.startswith(prefer)))


def follows_torch(lib) -> bool:
    """Whether ``lib``'s ``omp_get_max_threads()`` reports what ``torch.set_num_threads`` just
    set, for two values in a row: then ``lib`` is the runtime whose threads torch runs its
    parallel regions on (another copy keeps its own setting). torch's thread count is restored."""
    import torch

    get = getattr(lib, "omp_get_max_threads", None)
    if get is None:
        return False
    get.restype, get.argtypes = ctypes.c_int, []
    before = torch.get_num_threads()
    try:
        for probe in (before + 1, before + 2):
            torch.set_num_threads(probe)
            if get() != probe:
                return False
        return True
    finally:
        torch.set_num_threads(before)


def _libraries(maps_path: str):
    """``(name, library)`` candidates in the order of the module docstring."""
    import torch

    try:
        yield "the global symbol scope", ctypes.CDLL(None)
    except OSError:
        pass
    try:
        with open(maps_path) as f:
            maps = f.read()
    except OSError:
        return
    for path in loaded_runtimes(maps, os.path.dirname(os.path.abspath(torch.__file__))):
        try:
            yield path, ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue


def gomp_parallel_address(maps_path: str = "/proc/self/maps") -> int | None:
    """The address of ``GOMP_parallel`` in the OpenMP runtime torch's threads run on, or
    ``None`` where none is found (not Linux, torch built without OpenMP, no loaded runtime
    that :func:`follows_torch`)."""
    for _, lib in _libraries(maps_path):
        entry = getattr(lib, "GOMP_parallel", None)
        if entry is not None and follows_torch(lib):
            return ctypes.cast(entry, ctypes.c_void_p).value
    return None
