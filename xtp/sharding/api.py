"""``xtp.shard(model)``: apply a plan in place on this rank's TP group.

Everything that can fail (planning, validation, slicing) happens before the model is touched;
if applying still fails, every module gets its class and parameters back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..accelerators import Communicator
from ..accelerators.comm.compiled import handle as op_handle
from ..distributed.consistency import check_fingerprints, fingerprint, verify_replicated
from ..distributed.setup import TPContext, init_distributed
from ..errors import AlreadyShardedError, PlanError
from ..planning.derive import derive_plan
from ..planning.layouts import take_ranges
from ..planning.spec import (
    COLUMN,
    EMBEDDING,
    IN_OUT,
    LM_HEAD,
    OUT_IN,
    ROW,
    VOCAB_EMBEDDING,
    ModuleSpec,
    ParamSplit,
    ShardPlan,
)
from .layers import (
    RegionRNG,
    TPModule,
    head_slicing_hook,
    parallel_class,
    partial_grad_hook,
    set_local_features,
    shared_rows_grad_hook,
)

PLAN_ATTR = "_xtp_plan"
CONTEXT_ATTR = "_xtp_context"


@dataclass
class _Change:
    module: nn.Module
    role: str
    kind: str
    params: dict[str, torch.Tensor]
    meta: dict


def weight_dim(kind: str, split: str) -> int:
    """The weight dimension a split refers to, for a weight stored as ``kind``."""
    if kind == EMBEDDING:
        return 0 if split == "vocab" else 1
    if kind == OUT_IN:
        return 0 if split == "out" else 1
    return 1 if split == "out" else 0


def sharded_plan(model: nn.Module) -> ShardPlan | None:
    """The plan a model was sharded with, or ``None``."""
    return getattr(model, PLAN_ATTR, None)


def _check_not_sharded(model: nn.Module, ctx: TPContext) -> None:
    plan = sharded_plan(model)
    if plan is not None or any(isinstance(m, TPModule) for m in model.modules()):
        other = getattr(model, CONTEXT_ATTR, None)
        where = ""
        if other is not None and other.tp_group is not ctx.tp_group:
            where = " on another process group"
        raise AlreadyShardedError(
            f"this model is already sharded{where} (tp_size="
            f"{plan.tp_size if plan else '?'}); shard the original, unsharded model, or load it "
            "again with xtp.from_pretrained"
        )


def slice_param(tensor: torch.Tensor, split: ParamSplit, rank: int) -> torch.Tensor:
    """This rank's piece of ``tensor`` under ``split`` (a new tensor)."""
    local = take_ranges(tensor.detach(), split.dim, split.ranges[rank])
    if split.zero_off_rank0 and rank != 0:
        local.zero_()
    return local


def slice_module(module: nn.Module, spec: ModuleSpec, rank: int) -> dict[str, torch.Tensor]:
    """This rank's pieces of ``module``'s split parameters: ``{param name: tensor}``."""
    out = {}
    for split in spec.param_splits():
        tensor = module._parameters.get(split.param)
        if tensor is not None:
            out[split.param] = slice_param(tensor, split, rank)
    return out


def _rank_meta(spec: ModuleSpec, plan: ShardPlan, rank: int) -> dict:
    meta = {}
    if spec.role == LM_HEAD:
        meta["tp_sizes"] = tuple(spec.local_extent(r) for r in range(plan.tp_size))
    if spec.role == VOCAB_EMBEDDING:
        meta["tp_vocab_start"] = spec.ranges[rank][0][0]
    if spec.kind in (OUT_IN, IN_OUT):
        meta["tp_kind"] = spec.kind
    return meta


def _prepare(model: nn.Module, plan: ShardPlan, rank: int) -> list[_Change]:
    modules = dict(model.named_modules())
    changes = []
    memo: dict[int, torch.Tensor] = {}
    for spec in plan.sharded():
        mod = modules[spec.name]
        if any(p.is_meta for p in mod.parameters(recurse=False)):
            raise PlanError(
                f"{spec.name} has no weights (meta device); use xtp.from_pretrained(path) to "
                "load a checkpoint straight into shards"
            )
        params = {}
        for split in spec.param_splits():
            tensor = mod._parameters.get(split.param)
            if tensor is None:
                continue
            if id(tensor) not in memo:  # tied parameters are sliced once
                memo[id(tensor)] = slice_param(tensor, split, rank)
            params[split.param] = memo[id(tensor)]
        changes.append(_Change(mod, spec.role, spec.kind, params, _rank_meta(spec, plan, rank)))
    return changes


def shared_pieces(split: ParamSplit, rank: int) -> tuple[tuple[tuple[int, int, int], ...], int]:
    """Rows of ``split`` that more than one rank holds (replicated KV heads): this rank's
    ``(local_start, buffer_start, length)`` pieces of them, and how many such rows exist."""
    cuts = sorted({x for ranges in split.ranges for a, b in ranges for x in (a, b)})
    shared = []  # (start, stop) of rows held by >= 2 ranks, merged
    for a, b in zip(cuts, cuts[1:]):
        holders = sum(any(x <= a and b <= y for x, y in ranges) for ranges in split.ranges)
        if holders >= 2:
            if shared and shared[-1][1] == a:
                shared[-1] = (shared[-1][0], b)
            else:
                shared.append((a, b))
    starts, total = [], 0  # where each shared range begins in the compact buffer
    for a, b in shared:
        starts.append(total)
        total += b - a
    pieces, local = [], 0
    for a, b in split.ranges[rank]:
        for (x, y), start in zip(shared, starts):
            lo, hi = max(a, x), min(b, y)
            if lo < hi:
                pieces.append((local + lo - a, start + lo - x, hi - lo))
        local += b - a
    return tuple(pieces), total


def _register_split_grad_hooks(plan: ShardPlan, modules: dict, comm: Communicator, rank: int,
                               undo: list) -> None:
    """Gradient hooks for split parameters whose gradient is not complete on one rank: rows
    held by several ranks (replicated KV heads) are summed over the group; a parameter only
    rank 0 holds (``zero_off_rank0``) keeps a zero gradient elsewhere, so it stays zero."""
    seen: set[int] = set()
    for spec in plan.sharded():
        for split in spec.param_splits():
            p = modules[spec.name]._parameters.get(split.param)
            if p is None or not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if split.zero_off_rank0:
                if rank != 0:
                    undo.append(p.register_hook(torch.zeros_like).remove)
                continue
            pieces, n_shared = shared_pieces(split, rank)
            if n_shared:
                hook = shared_rows_grad_hook(comm, split.dim, pieces, n_shared)
                undo.append(p.register_hook(hook).remove)


def _apply(model, plan, changes, comm, rank, device, undo: list) -> None:
    """Change the model in place; append to ``undo`` a callable per step that reverts it."""
    modules = dict(model.named_modules())
    new_params: dict[int, nn.Parameter] = {}
    rng = RegionRNG(rank)  # one per model: shared by its column and row layers
    for ch in changes:
        mod = ch.module
        state = (mod.__class__, dict(mod.__dict__), dict(mod._parameters))

        def restore(mod=mod, state=state):
            cls, attrs, params = state
            mod.__class__ = cls
            mod.__dict__.clear()
            mod.__dict__.update(attrs)
            mod._parameters.clear()
            mod._parameters.update(params)

        undo.append(restore)
        for name, tensor in ch.params.items():
            old = mod._parameters[name]
            if id(tensor) not in new_params:
                new_params[id(tensor)] = nn.Parameter(tensor, requires_grad=old.requires_grad)
            setattr(mod, name, new_params[id(tensor)])
        mod.__class__ = parallel_class(ch.role, type(mod))
        mod.tp_comm = comm
        op_handle(comm)  # named for torch.compile's collective ops before any tracing
        if ch.role in (COLUMN, ROW):
            mod.tp_rng = rng
        for k, v in ch.meta.items():
            setattr(mod, k, v)
        set_local_features(mod, ch.kind)
        if ch.role == VOCAB_EMBEDDING and getattr(mod, "padding_idx", None) is not None:
            local = mod.padding_idx - ch.meta["tp_vocab_start"]
            mod.padding_idx = local if 0 <= local < mod.weight.shape[0] else None
    for upd in plan.attr_updates:
        holder = modules[upd.module]
        old_value = getattr(holder, upd.attr)
        undo.append(lambda h=holder, a=upd.attr, v=old_value: setattr(h, a, v))
        setattr(holder, upd.attr, upd.values[rank])
    for name, kwarg, layout, heads, num_heads in plan.head_sliced_kwargs:
        handle = modules[name].register_forward_pre_hook(
            head_slicing_hook(kwarg, layout, heads[rank], num_heads), with_kwargs=True)
        undo.append(handle.remove)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in plan.partial_grad_params:
        if name in params and params[name].requires_grad:
            undo.append(params[name].register_hook(partial_grad_hook(comm)).remove)
    _register_split_grad_hooks(plan, modules, comm, rank, undo)
    for name, values in plan.local_configs:
        mod = modules[name]
        undo.append(lambda m=mod, c=mod.config: setattr(m, "config", c))
        local = copy.copy(mod.config)
        for attr, per_rank in values:
            setattr(local, attr, per_rank[rank])
        mod.config = local
    if device is not None and device.type != "meta":
        before = {id(p): p.device for p in model.parameters()}
        first = next(iter(before.values()), None)
        if first is not None:
            undo.append(lambda: model.to(first))
        model.to(device)


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

    The model's forward, ``generate()`` and hooks keep working; other ranks' weights are freed
    once nothing else references them. Raises :class:`~xtp.errors.XtpError` subclasses for bad
    input, and leaves the model unchanged when anything fails.
    """
    ctx = context or init_distributed(tp_size, group=group)
    _check_not_sharded(model, ctx)
    if plan is None:
        plan = derive_plan(model, ctx.tp_size, rules)
    elif plan.tp_size != ctx.tp_size:
        raise PlanError(f"the plan is for tp_size={plan.tp_size}, this group has {ctx.tp_size}")
    if ctx.tp_size > 1:  # cheap: one small all-gather, before anything changes
        check_fingerprints(fingerprint(model, plan), ctx.tp_group)
        if verify:
            verify_replicated(model, plan, ctx.tp_group)
    base = ctx.communicator()
    comm = communicator(base) if callable(communicator) and not isinstance(
        communicator, Communicator) else (communicator or base)
    rank = ctx.tp_rank
    changes = _prepare(model, plan, rank) if ctx.tp_size > 1 else []
    undo: list = []
    try:
        _apply(model, plan, changes, comm, rank, ctx.device, undo)
    except BaseException:
        for step in reversed(undo):  # best effort: one failing step must not stop the others
            try:
                step()
            except Exception:  # noqa: BLE001
                pass
        raise
    setattr(model, PLAN_ATTR, plan)
    setattr(model, CONTEXT_ATTR, ctx)
    return model


