"""A rank's tensors under a plan: what loading, saving and checkpoints read and write.

:func:`local_entries` lists every unique tensor of the model's ``state_dict`` (tied aliases
grouped), with the slice of it rank ``rank`` owns: ``dim`` and ``ranges`` along that dim
(``None``: the whole tensor), and ``zero`` when this rank holds zeros of that shape (a bias
added once after an all-reduce). The splits are the plan's own
(:meth:`xtp.planning.spec.ModuleSpec.param_splits`), the same that :func:`xtp.shard` slices by.
Once every entry holds this rank's tensor, :func:`xtp.sharding.apply.adopt_local_shards`
finishes the model exactly as :func:`xtp.shard` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..planning.layouts import ranges_len
from ..planning.spec import SHARDED_ROLES, Ranges, ShardPlan


@dataclass
class Entry:
    """One unique tensor: its state-dict names, owners, meta template and this rank's slice."""

    aliases: list[str]
    holders: list[tuple[nn.Module, str]]
    meta: torch.Tensor
    is_param: bool
    dim: int | None = None
    ranges: Ranges | None = None
    zero: bool = False
    full_shape: tuple[int, ...] = field(default=())

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        if self.dim is not None:
            shape[self.dim] = ranges_len(self.ranges)
        return tuple(shape)

    @property
    def sharded(self) -> bool:
        return self.dim is not None and self.local_shape != self.full_shape

    def set(self, value: torch.Tensor) -> None:
        """Put ``value`` (this rank's tensor) in every holder; tied aliases stay one object."""
        if self.is_param:
            value = nn.Parameter(value, requires_grad=self.meta.requires_grad)
            for mod, attr in self.holders:
                mod._parameters[attr] = value
        else:
            for mod, attr in self.holders:
                mod._buffers[attr] = value


def param_split(plan: ShardPlan | None, name: str):
    """The plan's :class:`~xtp.planning.spec.ParamSplit` of state-dict tensor ``name``, or None."""
    if plan is None or "." not in name:
        return None
    module, attr = name.rsplit(".", 1)
    spec = plan.spec(module)
    if spec is None or spec.role not in SHARDED_ROLES:
        return None
    return next((s for s in spec.param_splits() if s.param == attr), None)


def tensor_slice(plan: ShardPlan | None, name: str, rank: int
                 ) -> tuple[int | None, Ranges | None, bool]:
    """(dim, ranges, zero) of tensor ``name`` on rank ``rank``; (None, None, False) = whole."""
    split = param_split(plan, name)
    if split is None:
        return None, None, False
    return split.dim, split.ranges[rank], bool(split.zero_off_rank0 and rank != 0)


def local_entries(model: nn.Module, plan: ShardPlan | None, rank: int) -> list[Entry]:
    """Unique parameters and persistent buffers of ``model``, in ``state_dict`` order."""
    by_id: dict[int, Entry] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        pre = f"{mname}." if mname else ""
        items = [(a, t, True) for a, t in mod._parameters.items()]
        items += [(a, t, False) for a, t in mod._buffers.items()
                  if a not in mod._non_persistent_buffers_set]
        for attr, t, is_param in items:
            if t is None:
                continue
            name = pre + attr
            entry = by_id.get(id(t))
            if entry is None:
                entry = by_id[id(t)] = Entry([], [], t, is_param, full_shape=tuple(t.shape))
            if (mod, attr) not in [(m, a) for m, a in entry.holders]:
                entry.holders.append((mod, attr))
            if name not in entry.aliases:
                entry.aliases.append(name)
    for entry in by_id.values():
        # a module reachable under two paths (T5's shared embedding in transformers 4) is
        # planned under one of them: the other path has no spec and does not vote
        planned = [a for a in entry.aliases
                   if plan is not None and plan.spec(a.rsplit(".", 1)[0]) is not None]
        slices = {tensor_slice(plan, a, rank) for a in planned or entry.aliases}
        if len(slices) > 1:
            raise ValueError(f"tied tensor {entry.aliases} is sliced differently by its owners")
        entry.dim, entry.ranges, entry.zero = slices.pop()
    return list(by_id.values())
