"""Cross-rank consistency checks: a cheap fingerprint exchange at setup, and opt-in verification.

* :func:`exchange_identities` (``init_distributed``, world > 1): every rank records every rank's
  host and pid (so a later failed collective can name a dead rank) and the ranks check they
  agree on the TP size and the xtp/torch versions.
* :func:`check_fingerprints` (always, at ``shard()`` time, tp > 1): every rank of the TP group
  sends a small dict (xtp/torch/transformers versions, tp_size, the model's config, the plan's
  digest; in ``from_pretrained`` also :func:`checkpoint_digest`); any difference raises
  :class:`RanksDisagreeError` naming the field and the ranks.
* :func:`verify_replicated` (``shard(..., verify=True)``): checksums of every parameter (all
  still whole before slicing) must be identical on all ranks (one all-gather of a vector of
  checksums): ranks that built or loaded different weights are caught, not just replicated
  ones.
* :func:`all_ranks_ok` (saving checkpoints): a barrier over the world that carries a failure,
  so every rank raises when one failed.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..accelerators.comm.failures import guarded, record_peers
from ..errors import RanksDisagreeError
from ..planning.spec import SHARDED_ROLES, ShardPlan
from .context import TPContext

__all__ = ["RanksDisagreeError", "all_ranks_ok", "check_fingerprints", "checkpoint_digest",
           "disagreement", "exchange_identities", "fingerprint", "verify_replicated"]


_LOCAL_CONFIG_KEYS = frozenset({"_name_or_path", "_commit_hash"})


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(model: nn.Module, plan: ShardPlan) -> dict[str, str]:
    """What must agree across the ranks of a TP group, as short strings."""
    import transformers

    from .._version import __version__  # read at call time, not at import

    config = getattr(model, "config", None)
    cfg = config.to_dict() if hasattr(config, "to_dict") else None
    if isinstance(cfg, dict):  # where it was loaded from may differ (copies on each node)
        cfg = {k: v for k, v in cfg.items() if k not in _LOCAL_CONFIG_KEYS}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return {
        "xtp version": __version__,
        "torch version": torch.__version__,
        "transformers version": transformers.__version__,
        "tp_size": str(plan.tp_size),
        "model class": type(model).__name__,
        "model config": _digest(cfg),
        "parameter shapes": _digest(shapes),
        "plan": _digest(plan.to_dict()),
    }


_SAMPLE = 64 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def checkpoint_digest(folder: str | os.PathLike) -> str:
    """A short digest of the weight files in ``folder``: their names, sizes and first and last
    64 KiB (the safetensors header and some tensor bytes). Equal on ranks reading the same
    checkpoint (copies at other paths included), different for another checkpoint of the same
    model (other weights) with near certainty; reads at most 128 KiB per file."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.suffix not in WEIGHT_SUFFIXES or not path.is_file():
            continue
        size = path.stat().st_size
        h.update(f"{path.name}:{size}:".encode())
        with open(path, "rb") as f:
            h.update(f.read(_SAMPLE))
            if size > _SAMPLE:
                f.seek(max(_SAMPLE, size - _SAMPLE))
                h.update(f.read(_SAMPLE))
    return h.hexdigest()[:16]


def disagreement(everyone: list[dict]) -> str | None:
    """``"KEY (ranks 0, 2: A; ranks 1: B)"`` for the first key whose values differ between the
    dicts (one per rank), else ``None``."""
    for key in everyone[0]:
        values = [fp.get(key) for fp in everyone]
        if len(set(values)) > 1:
            by_value: dict[str, list[int]] = {}
            for rank, v in enumerate(values):
                by_value.setdefault(v, []).append(rank)
            detail = "; ".join(f"ranks {', '.join(map(str, r))}: {v}"
                               for v, r in by_value.items())
            return f"{key} ({detail})"
    return None


def exchange_identities(group: dist.ProcessGroup | None, tp_size: int | None,
                        timeout: timedelta) -> None:
    """Record every rank's host and pid (for naming a failed rank later) and check the ranks
    agree on the TP size (``tp_size``, ``None``: the size of ``group``) and the software
    versions; collective over ``group`` (``None``: the world). ``timeout`` is quoted in later
    error messages.

    Raises:
        RanksDisagreeError: a rank asked for another tp_size or runs other xtp/torch versions.
    """
    from .._version import __version__

    mine = {"tp_size": str(tp_size or dist.get_world_size(group)), "xtp version": __version__,
            "torch version": torch.__version__}
    detail = disagreement(record_peers(group, mine, timeout.total_seconds()))
    if detail:
        raise RanksDisagreeError(
            f"the ranks disagree at init_distributed on {detail}: start every rank with the "
            "same tp_size and the same installed software")


def all_ranks_ok(ok: bool, ctx: TPContext, step: str = "a collective write") -> bool:
    """True when every rank of the world says ``ok``: a barrier over the world that carries a
    failure (one MIN all-reduce of a flag on ``ctx.device``; collective on every rank). In a
    single process or a world of one rank, ``ok`` itself.

    ``step`` names the barrier in errors: a rank that died or hangs before it raises
    :class:`~xtp.accelerators.errors.CollectiveError` (exited) or
    :class:`~xtp.accelerators.errors.CollectiveTimeoutError` (did not reach it within
    ``XTP_TIMEOUT``) naming that rank on every other rank."""
    if ctx.world_size == 1 or not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], device=ctx.device)
    with guarded(f"the every-rank-succeeded barrier of {step}", None):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def check_fingerprints(mine: dict[str, str], group) -> None:
    """All-gather ``mine`` over ``group``; raise :class:`RanksDisagreeError` on a difference."""
    world = dist.get_world_size(group)
    everyone: list = [None] * world
    with guarded("the fingerprint exchange (model, plan, versions)", group):
        dist.all_gather_object(everyone, mine, group=group)
    detail = disagreement(everyone)
    if detail:
        raise RanksDisagreeError(
            f"the ranks of this TP group disagree on {detail}. Every rank must "
            "load the same model with the same tp_size and the same software versions"
        )


def verify_replicated(model: nn.Module, plan: ShardPlan, group, whole: bool = True) -> None:
    """Raise :class:`RanksDisagreeError` if a parameter differs across ranks.

    ``whole=True`` (how :func:`xtp.shard` calls it, before slicing): every parameter is
    still whole on every rank, so all are compared; otherwise only the replicated ones."""
    sharded = set() if whole else {s.name for s in plan.specs if s.role in SHARDED_ROLES}
    names, sums = [], []
    for mod_name, mod in model.named_modules():
        if mod_name in sharded:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            names.append(f"{mod_name}.{pname}" if mod_name else pname)
            t = p.detach().double()
            peak = t.abs().max() if t.numel() else t.sum()
            sums.append(torch.stack([t.sum(), (t * t).sum(), peak]))
    if not sums:
        return
    local = torch.stack(sums).to(next(model.parameters()).device)
    world = dist.get_world_size(group)
    everyone = [torch.empty_like(local) for _ in range(world)]
    with guarded("the checksum exchange of verify=True", group):
        dist.all_gather(everyone, local, group=group)
    for r, other in enumerate(everyone):
        bad = (other != local).any(dim=1).nonzero().flatten().tolist()
        if bad:
            listed = ", ".join(names[i] for i in bad[:5])
            raise RanksDisagreeError(
                f"{'' if whole else 'replicated '}parameters differ between this rank and TP "
                f"rank {r}: {listed}"
                f"{' ...' if len(bad) > 5 else ''}. Load or initialise the model identically on "
                "every rank (same checkpoint, or the same seed before building it)"
            )
