"""``xtp.shard(model)``: shard a model holding its full weights, in place, on this rank's TP group.

Everything that can fail (planning, the cross-rank checks, slicing) happens before the model is
touched; if applying still fails, every module gets its class and parameters back
(:mod:`xtp.sharding.apply`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..accelerators import Communicator
from ..distributed.consistency import check_fingerprints, fingerprint, verify_replicated
from ..distributed.context import TPContext
from ..distributed.setup import init_distributed
from ..errors import AlreadyShardedError, PlanError
from ..models.inputs import check_model, check_rules
from ..planning.derive import derive_plan
from ..planning.spec import ShardPlan
from .apply import apply_plan, resolve_communicator, slice_in_memory
from .check import check_local_forward
from .layers import TPModule
from .state import sharded_context, sharded_plan


def _check_not_sharded(model: nn.Module, ctx: TPContext) -> None:
    plan = sharded_plan(model)
    if plan is not None or any(isinstance(m, TPModule) for m in model.modules()):
        other = sharded_context(model)
        where = ""
        if other is not None and other.tp_group is not ctx.tp_group:
            where = " on another process group"
        raise AlreadyShardedError(
            f"this model is already sharded{where} (tp_size="
            f"{plan.tp_size if plan else '?'}); shard the original, unsharded model, or load it "
            "again with xtp.from_pretrained"
        )


def shard(
    model: nn.Module,
    tp_size: int | None = None,
    group=None,
    rules: dict[str, str] | None = None,
    *,
    context: TPContext | None = None,
    communicator: Communicator | Callable[[Communicator], Communicator] | None = None,
    plan: ShardPlan | None = None,
    verify: bool = False,
    heads: int | None = None,
    kv_heads: int | None = None,
) -> nn.Module:
    """Shard ``model`` in place for tensor parallelism on this rank's TP group; returns it.

    Args:
        model: an unsharded ``nn.Module`` with its weights loaded (any device).
        tp_size: ranks per TP group (default: the whole world, or ``group``'s size).
        group: an existing process group to shard over.
        rules: ``{glob over module paths: role}`` overrides (role: ``"replicate"``).
        context: a :class:`~xtp.TPContext` from :func:`xtp.init_distributed` (default: made).
        communicator: a Communicator, or a wrapper ``f(comm) -> comm`` (e.g. counting).
        plan: a precomputed plan for this model and tp_size (default: derived).
        verify: also check, before sharding, that every parameter is identical on all ranks
            (one all-gather of checksums).
        heads, kv_heads: attention head counts for a model whose config does not hold them
            and whose forward does not show them (passed to the planner).

    The model's forward, ``generate()`` and hooks keep working; other ranks' weights are freed
    once nothing else references them. Raises :class:`~xtp.errors.XtpError` subclasses for bad
    input, and leaves the model unchanged when anything fails.
    """
    check_model(model)  # plain arguments first: nothing starts on bad input
    check_rules(rules)
    ctx = context or init_distributed(tp_size, group=group)
    _check_not_sharded(model, ctx)
    if plan is None:
        plan = derive_plan(model, ctx.tp_size, rules, heads=heads, kv_heads=kv_heads)
    elif plan.tp_size != ctx.tp_size:
        raise PlanError(f"the plan is for tp_size={plan.tp_size}, this group has {ctx.tp_size}")
    if ctx.tp_size > 1:  # cheap: one small all-gather, before anything changes
        check_fingerprints(fingerprint(model, plan), ctx.tp_group)
        if verify:
            verify_replicated(model, plan, ctx.tp_group)
    check_local_forward(model, plan)  # fake tensors: refuse what the forward cannot run
    comm = resolve_communicator(ctx, communicator)
    changes = slice_in_memory(model, plan, ctx.tp_rank) if ctx.tp_size > 1 else []
    return apply_plan(model, plan, ctx, changes, comm)


