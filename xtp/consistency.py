"""Cross-rank consistency checks: a cheap fingerprint exchange at setup, and opt-in verification.

* :func:`check_fingerprints` (always, at ``shard()`` time, tp > 1): every rank of the TP group
  sends a small dict (xtp/torch/transformers versions, tp_size, the model's config, the plan's
  digest); any difference raises :class:`RanksDisagreeError` naming the field and the ranks.
* :func:`verify_replicated` (``shard(..., verify=True)``): checksums of every replicated
  parameter must be identical on all ranks (one all-gather of a vector of checksums).
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist
from torch import nn

from .errors import XtpError
from .plan import SHARDED_ROLES, ShardPlan


class RanksDisagreeError(XtpError):
    """Ranks of one TP group were given different models, sizes, plans or software versions."""


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(model: nn.Module, plan: ShardPlan) -> dict[str, str]:
    """What must agree across the ranks of a TP group, as short strings."""
    import transformers

    from . import __version__

    config = getattr(model, "config", None)
    cfg = config.to_dict() if hasattr(config, "to_dict") else None
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


def check_fingerprints(mine: dict[str, str], group) -> None:
    """All-gather ``mine`` over ``group``; raise :class:`RanksDisagreeError` on a difference."""
    world = dist.get_world_size(group)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    for key in mine:
        values = [fp[key] for fp in everyone]
        if len(set(values)) > 1:
            by_value: dict[str, list[int]] = {}
            for rank, v in enumerate(values):
                by_value.setdefault(v, []).append(rank)
            detail = "; ".join(f"ranks {r}: {v}" for v, r in by_value.items())
            raise RanksDisagreeError(
                f"the ranks of this TP group disagree on {key} ({detail}). Every rank must "
                "load the same model with the same tp_size and the same software versions"
            )


def verify_replicated(model: nn.Module, plan: ShardPlan, group) -> None:
    """Raise :class:`RanksDisagreeError` if any replicated parameter differs across ranks."""
    sharded = {s.name for s in plan.specs if s.role in SHARDED_ROLES}
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
    dist.all_gather(everyone, local, group=group)
    for r, other in enumerate(everyone):
        bad = (other != local).any(dim=1).nonzero().flatten().tolist()
        if bad:
            listed = ", ".join(names[i] for i in bad[:5])
            raise RanksDisagreeError(
                f"replicated parameters differ between this rank and TP rank {r}: {listed}"
                f"{' ...' if len(bad) > 5 else ''}. Load or initialise the model identically on "
                "every rank (same checkpoint, or the same seed before building it)"
            )
