"""torch's own OpenMP threads for xtp's GEMV kernel: the address of ``GOMP_parallel`` in the
OpenMP runtime torch has loaded.

torch's CPU builds run their intra-op parallel regions on an OpenMP thread team (GNU libgomp,
bundled with the wheels, or Intel's libiomp5, which exports the GNU entry points too). The
kernel, a C extension built without torch headers and without OpenMP, runs a product on that
same team by calling the runtime's ``GOMP_parallel(fn, data, num_threads, flags)`` (what GCC
emits for ``#pragma omp parallel``), at the address found here in the library already loaded:
nothing is loaded that was not. Then the product's threads are the threads torch's ops run on
(and which spin after each of them), not a second set competing for the rank's cores.

Linux only (loaded libraries are read from ``/proc/self/maps``); where no runtime is found,
the kernel's own pool serves (``accelerators/cpu/csrc/gemv_pool.c``).
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


def gomp_parallel_address(maps_path: str = "/proc/self/maps") -> int | None:
    """The address of ``GOMP_parallel`` in the OpenMP runtime torch loaded, or ``None`` where
    none is found (not Linux, torch built without OpenMP, a runtime without that entry)."""
    import torch

    try:
        with open(maps_path) as f:
            maps = f.read()
    except OSError:
        return None
    prefer = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    for path in loaded_runtimes(maps, prefer):
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            return ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None
