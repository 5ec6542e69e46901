"""What to say when ``init_process_group`` fails: how many ranks reached the rendezvous.

torch reports a failed rendezvous in words that depend on the side that saw it (rank 0, which
hosts the store, or another rank) and on the backend; :func:`setup_failure` reads those words
and the launcher's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)
and returns one :class:`~xtp.errors.DistributedSetupError` saying which ranks did not arrive
and where to look.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta

from ..errors import DistributedSetupError


def setup_failure(backend: str, exc: Exception, timeout: timedelta) -> DistributedSetupError:
    """A one-paragraph account of ``exc``, raised by ``init_process_group(backend, timeout)``:
    how many ranks arrived, or which side of the rendezvous gave up; ends with torch's reason."""
    env = os.environ
    rank, world = env.get("RANK"), env.get("WORLD_SIZE")
    where = f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"
    text = str(exc)
    reason = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    secs = f"{timeout.total_seconds():g} s"
    lower = text.lower()
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    if joined:
        came, want = int(joined[1]), int(joined[2])
        what = (f"only {came} of {want} ranks reached the rendezvous at {where} within {secs} "
                f"(this is rank {rank}); the other {want - came} never called "
                "init_distributed: they crashed or hang before it (see their output), were "
                "not started, or use another MASTER_ADDR/MASTER_PORT")
    elif "connect" in lower and ("timed out" in lower or "refused" in text):
        what = (f"rank {rank} of {world} could not reach the rendezvous at {where} within "
                f"{secs}: rank 0, which hosts it, did not start, died, or listens elsewhere "
                "(check MASTER_ADDR/MASTER_PORT and rank 0's output)")
    elif "connection was likely closed" in lower or "failed to recv" in lower:
        what = (f"rank {rank} of {world} lost the rendezvous at {where} while waiting for the "
                f"other ranks: rank 0, which hosts it, gave up (rank 0's error says how many "
                "ranks arrived) or died")
    elif "wait timeout" in lower or "timed out" in lower:
        what = (f"rank {rank} of {world} waited {secs} at the rendezvous ({where}) for the "
                f"other ranks; not all {world} arrived (rank 0's error says how many did): the "
                "missing ones crashed or hang before init_distributed (see their output)")
    else:
        what = (f"could not create the {backend!r} process group (rank {rank}/{world}, "
                f"MASTER_ADDR={env.get('MASTER_ADDR')}, MASTER_PORT={env.get('MASTER_PORT')}); "
                f"{world} ranks were expected")
    return DistributedSetupError(f"{what}. Set XTP_TIMEOUT to wait longer. (torch: {reason})")
