"""Running one function on N local ranks, for the CLI sub-commands (``run``, ``verify``).

Under ``torchrun`` (``RANK`` set) or for one rank, the function runs in this process and the
ranks' results are all-gathered to rank 0. Otherwise the N ranks are started with torch's
elastic launcher (``torch.distributed.launcher.api.elastic_launch``), one process per rank,
and their return values come back to this process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from ..errors import XtpError


def set_threads_env(tp: int) -> int:
    """Default ``OMP_NUM_THREADS`` for ranks this process starts (kept when already set);
    returns the value in effect."""
    from ..accelerators.cpu_threads import threads_per_rank

    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(tp)))
    return int(os.environ["OMP_NUM_THREADS"])


def run_on_ranks(fn: Callable[..., dict], params: Sequence, tp: int, run_id: str
                 ) -> list[dict] | None:
    """``fn(*params)`` on each of ``tp`` ranks; the results in rank order on the reporting
    process, ``None`` on the other ranks of an outer ``torchrun``.

    Raises:
        XtpError: a started rank failed (the message is that rank's last error line).
    """
    if "RANK" in os.environ or tp == 1:
        result = fn(*params)
        import torch.distributed as dist

        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, result)
            return gathered if dist.get_rank() == 0 else None
        return [result]
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    set_threads_env(tp)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=tp, run_id=run_id,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=0.1)
    try:
        results = elastic_launch(config, fn)(*params)
    except Exception as exc:  # ChildFailedError: one line, the failing rank's error
        raise XtpError(f"a rank failed: {str(exc).strip().splitlines()[-1][:400]}") from exc
    return [results[r] for r in sorted(results)]
