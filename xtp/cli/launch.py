"""Running one function on N local ranks, for the CLI sub-commands (``run``, ``verify``).

Under ``torchrun`` (``RANK`` set) or for one rank, the function runs in this process and the
ranks' results are all-gathered to rank 0. Otherwise the N ranks are started with torch's
elastic launcher (``torch.distributed.launcher.api.elastic_launch``), one process per rank,
and their return values come back to this process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from ..errors import XtpError


def set_threads_env(tp: int) -> int:
    """Default ``OMP_NUM_THREADS`` for ranks this process starts (kept when already set): each
    rank's cores when they are pinned (:mod:`xtp.cli.placement`), else the available cores /
    ``tp``; returns the value in effect."""
    from ..accelerators.cpu.threads import threads_per_rank
    from .placement import local_placement

    placement = local_placement(tp)
    threads = placement.threads if placement is not None else threads_per_rank(tp)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return int(os.environ["OMP_NUM_THREADS"])


def pin_started_ranks() -> str | None:
    """Have the ranks this process starts pin themselves to their cores (in
    ``xtp.init_distributed``) unless ``XTP_PIN`` says otherwise; returns the previous
    ``XTP_PIN`` (``None``: unset) for :func:`restore_pin`."""
    from ..accelerators.env import ENV_PIN, pin_mode

    previous = os.environ.get(ENV_PIN)
    if pin_mode() == "auto":
        os.environ[ENV_PIN] = "1"
    return previous


def restore_pin(previous: str | None) -> None:
    from ..accelerators.env import ENV_PIN

    if previous is None:
        os.environ.pop(ENV_PIN, None)
    else:
        os.environ[ENV_PIN] = previous


def check_environment() -> None:
    """Parse every ``XTP_*`` variable and select the accelerator here, once, so that a bad value
    is one error before any rank starts (EnvSettingError / AcceleratorError naming it)."""
    from ..accelerators import env, select

    for parse in (env.timeout_seconds, env.shm_chunk_bytes, env.cpu_pack, env.num_threads,
                  env.cross_node_tp, env.pin_mode, env.gemv_threads, env.gemv_team,
                  env.gemv_split):
        parse()
    select()


def run_on_ranks(fn: Callable[..., dict], params: Sequence, tp: int, run_id: str
                 ) -> list[dict] | None:
    """``fn(*params)`` on each of ``tp`` ranks; the results in rank order on the reporting
    process, ``None`` on the other ranks of an outer ``torchrun``.

    Raises:
        XtpError: a started rank failed; one line per :func:`describe_failures` (the
            launcher's own tracebacks are kept out of the terminal).
    """
    check_environment()
    if "RANK" in os.environ or tp == 1:
        if "RANK" not in os.environ:  # xtp's own single rank: pinned like the ranks it starts
            from ..accelerators.cpu.placement import place_this_rank
            from .placement import local_placement

            if local_placement(1) is not None:
                place_this_rank(0, 1)
        result = fn(*params)
        import torch.distributed as dist

        if dist.is_initialized():
            from ..accelerators.comm.failures import guarded

            gathered = [None] * dist.get_world_size()
            with guarded("gathering the ranks' results"):
                dist.all_gather_object(gathered, result)
            return gathered if dist.get_rank() == 0 else None
        return [result]
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    set_threads_env(tp)
    previous_pin = pin_started_ranks()
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=tp, run_id=run_id,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=0.1)
    quiet = [logging.getLogger(n) for n in ("torch.distributed.elastic",
                                             "torch.multiprocessing.spawn")]
    levels = [log.level for log in quiet]
    for log in quiet:  # the agent logs each failure with a traceback; we say it in one line
        log.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, fn)(*params)
    except Exception as exc:  # ChildFailedError
        raise XtpError(describe_failures(exc, tp)) from exc
    finally:
        restore_pin(previous_pin)
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return [results[r] for r in sorted(results)]


def _one_failure(rank: int, failure) -> str:
    if failure.exitcode < 0:
        return (f"rank {rank} (pid {failure.pid}) was killed by signal "
                f"{failure.signal_name()}")
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    message = " ".join(str(message or "").split())
    if not message or message.startswith("To enable traceback"):
        message = f"exit code {failure.exitcode}"
    return f"rank {rank} (pid {failure.pid}) failed: {message}"


def describe_failures(exc: BaseException, tp: int) -> str:
    """One line for a launcher's ``ChildFailedError``: the first failed rank's error (a signal,
    or its exception's type and message), then the others' in the order they failed."""
    failures = getattr(exc, "failures", None)
    if not failures:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip(" =-")]
        return f"a rank failed: {(lines[-1] if lines else type(exc).__name__)[:400]}"
    order = sorted(failures.items(), key=lambda kv: (kv[1].timestamp, kv[1].exitcode >= 0, kv[0]))
    parts = [_one_failure(rank, f) for rank, f in order]
    first = parts[0] if len(parts[0]) <= 600 else parts[0][:597] + "..."
    more = "; then " + "; ".join(p[:200] for p in parts[1:]) if len(parts) > 1 else ""
    stopped = tp - len(failures)
    rest = f"; the launcher stopped the other {stopped}" if stopped else ""
    return f"{len(failures)} of {tp} ranks failed: {first}{more}{rest}"
