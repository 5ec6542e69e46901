"""Applying a plan to a model in place, by one path for both ways the local weights arrive.

* :func:`slice_in_memory`: the model holds full weights (:func:`xtp.shard`); each rank cuts its
  slices (``ParamSplit`` ranges; tied parameters once).
* :func:`adopt_local_shards`: every tensor already holds this rank's slice (a loader filled a
  meta skeleton: :func:`xtp.from_pretrained`).

Both hand :func:`apply_plan` one list of :class:`Change` (module, spec, its local parameters),
which swaps classes (:mod:`xtp.sharding.layers`), sets attributes and hooks, moves the model
to the context's device and records the plan. Every step registers its undo first: if
anything fails, the model gets its classes, parameters and attributes back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..accelerators import Communicator
from ..accelerators.comm.compiled import handle as op_handle
from ..distributed.context import TPContext
from ..errors import PlanError
from ..planning.layouts import take_ranges
from ..planning.spec import ModuleSpec, ParamSplit, ShardPlan
from .hooks import head_slicing_hook, partial_grad_hook, register_split_grad_hooks
from .layers import parallel_class
from .rng import RegionRNG
from .state import mark_sharded

CommunicatorArg = Communicator | Callable[[Communicator], Communicator] | None


@dataclass
class Change:
    """One sharded module: its spec and its split parameters' local tensors by name."""

    module: nn.Module
    spec: ModuleSpec
    params: dict[str, torch.Tensor]


def slice_param(tensor: torch.Tensor, split: ParamSplit, rank: int) -> torch.Tensor:
    """This rank's piece of ``tensor`` under ``split`` (a new tensor)."""
    local = take_ranges(tensor.detach(), split.dim, split.ranges[rank])
    if split.zero_off_rank0 and rank != 0:
        local.zero_()
    return local


def _changes(model: nn.Module, plan: ShardPlan,
             local: Callable[[torch.Tensor, ParamSplit], torch.Tensor]) -> list[Change]:
    """A :class:`Change` per sharded module; ``local(param, split)`` gives a parameter's local
    tensor, computed once per parameter object (tied parameters stay one tensor)."""
    modules = dict(model.named_modules())
    memo: dict[int, torch.Tensor] = {}
    changes = []
    for spec in plan.sharded():
        mod = modules[spec.name]
        params = {}
        for split in spec.param_splits():
            tensor = mod._parameters.get(split.param)
            if tensor is not None:
                if id(tensor) not in memo:
                    memo[id(tensor)] = local(tensor, split)
                params[split.param] = memo[id(tensor)]
        changes.append(Change(mod, spec, params))
    return changes


def slice_in_memory(model: nn.Module, plan: ShardPlan, rank: int) -> list[Change]:
    """This rank's slices of a model holding full weights (nothing on the model changes)."""
    modules = dict(model.named_modules())
    for spec in plan.sharded():
        if any(p.is_meta for p in modules[spec.name].parameters(recurse=False)):
            raise PlanError(
                f"{spec.name} has no weights (meta device); use xtp.from_pretrained(path) to "
                "load a checkpoint straight into shards"
            )
    return _changes(model, plan, lambda tensor, split: slice_param(tensor, split, rank))


def resolve_communicator(ctx: TPContext, communicator: CommunicatorArg) -> Communicator:
    """The context's communicator, replaced by ``communicator`` or wrapped when it is a
    function ``f(comm) -> comm`` (e.g. a counting wrapper)."""
    base = ctx.communicator()
    if callable(communicator) and not isinstance(communicator, Communicator):
        return communicator(base)
    return communicator or base


def _swap(ch: Change, comm: Communicator, tp_size: int, rank: int, rng: RegionRNG,
          new_params: dict[int, nn.Parameter], undo: list) -> None:
    """Put ``ch``'s local parameters in place and give its module its role's class."""
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
    mod.__class__ = parallel_class(ch.spec.role, type(mod))
    mod.tp_comm = comm
    op_handle(comm)  # named for torch.compile's collective ops before any tracing
    mod.tp_setup(ch.spec, tp_size, rank, rng)


def _set_attributes(plan: ShardPlan, modules: dict, rank: int, undo: list) -> None:
    """Per-rank attribute values (local head counts) and per-rank config copies."""
    for upd in plan.attr_updates:
        holder = modules[upd.module]
        old_value = getattr(holder, upd.attr)
        undo.append(lambda h=holder, a=upd.attr, v=old_value: setattr(h, a, v))
        setattr(holder, upd.attr, upd.values[rank])
    for name, values in plan.local_configs:
        mod = modules[name]
        undo.append(lambda m=mod, c=mod.config: setattr(m, "config", c))
        local = copy.copy(mod.config)
        for attr, per_rank in values:
            setattr(local, attr, per_rank[rank])
        mod.config = local


def _add_hooks(model: nn.Module, plan: ShardPlan, modules: dict, comm: Communicator,
               rank: int, undo: list) -> None:
    """Head-slicing pre-hooks and the gradient hooks of partial and shared gradients."""
    for name, kwarg, layout, heads, num_heads in plan.head_sliced_kwargs:
        handle = modules[name].register_forward_pre_hook(
            head_slicing_hook(kwarg, layout, heads[rank], num_heads), with_kwargs=True)
        undo.append(handle.remove)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in plan.partial_grad_params:
        if name in params and params[name].requires_grad:
            undo.append(params[name].register_hook(partial_grad_hook(comm)).remove)
    register_split_grad_hooks(plan, modules, comm, rank, undo)


def _move(model: nn.Module, device: torch.device | None, undo: list) -> None:
    if device is not None and device.type != "meta":
        before = {id(p): p.device for p in model.parameters()}
        first = next(iter(before.values()), None)
        if first is not None:
            undo.append(lambda: model.to(first))
        model.to(device)


def _rollback(undo: list) -> None:
    for step in reversed(undo):  # best effort: one failing step must not stop the others
        try:
            step()
        except Exception:  # noqa: BLE001
            pass


def apply_plan(model: nn.Module, plan: ShardPlan, ctx: TPContext, changes: list[Change],
               comm: Communicator) -> nn.Module:
    """Change ``model`` in place into this rank's shard (``comm``: the TP group's
    communicator, see :func:`resolve_communicator`); on any failure, undo every step."""
    rank = ctx.tp_rank
    modules = dict(model.named_modules())
    rng = RegionRNG(rank)  # one per model: shared by its column and row layers
    new_params: dict[int, nn.Parameter] = {}
    undo: list = []
    try:
        for ch in changes:
            _swap(ch, comm, plan.tp_size, rank, rng, new_params, undo)
        _set_attributes(plan, modules, rank, undo)
        _add_hooks(model, plan, modules, comm, rank, undo)
        _move(model, ctx.device, undo)
    except BaseException:
        _rollback(undo)
        raise
    mark_sharded(model, plan, ctx)
    return model


def adopt_local_shards(model: nn.Module, plan: ShardPlan, ctx: TPContext,
                       communicator: CommunicatorArg = None) -> nn.Module:
    """:func:`apply_plan` for a model whose every tensor already holds this rank's slice (on
    ``ctx.device``)."""
    comm = resolve_communicator(ctx, communicator)
    changes = (_changes(model, plan, lambda tensor, split: tensor.detach())
               if ctx.tp_size > 1 else [])
    return apply_plan(model, plan, ctx, changes, comm)
