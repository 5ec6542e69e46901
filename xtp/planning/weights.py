"""What kind of weight a module holds, and the :class:`~xtp.planning.spec.ModuleSpec` of one
module with its per-rank byte counts. Keyed by class, never by name."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layouts import ranges_len
from .spec import Layout, ModuleSpec, Ranges, Role, Split, WeightKind, split_dim


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def weight_kind(module: nn.Module) -> WeightKind | None:
    """How ``module`` stores its weight (OUT_IN, IN_OUT, EMBEDDING) or None if not a layer
    xtp can shard."""
    if isinstance(module, nn.Linear):
        return WeightKind.OUT_IN
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return WeightKind.IN_OUT
    if isinstance(module, nn.Embedding):
        return WeightKind.EMBEDDING
    return None


def plain_forward(module: nn.Module) -> bool:
    """True when a Linear-like module's class keeps the base class's ``forward`` (``x @ W.T +
    b``, or Conv1D's ``x @ W + b``)."""
    base = nn.Linear if isinstance(module, nn.Linear) else _conv1d_class()
    return base is not None and type(module).forward is base.forward


def in_out(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like module."""
    w = module.weight
    if weight_kind(module) == WeightKind.OUT_IN:
        return (w.shape[1], w.shape[0])
    return (w.shape[0], w.shape[1])


def nbytes(t: torch.Tensor | None) -> int:
    """Bytes of ``t`` (0 for None)."""
    return 0 if t is None else t.numel() * t.element_size()


def module_spec(name: str, module: nn.Module, kind: WeightKind, tp: int, role: Role,
                reason: str, split: Split | None = None, ranges: Sequence[Ranges] = (),
                layout: Layout | None = None, group: str | None = None) -> ModuleSpec:
    """The spec of a module with a 2-D ``weight`` (and maybe a ``bias``): ``ranges[r]`` of the
    dimension ``split`` cuts go to rank ``r``; replicated (every byte on every rank) when
    ``role`` is REPLICATE or there are no ranges. A bias is split along with output features
    and kept whole otherwise."""
    w, b = module.weight, getattr(module, "bias", None)
    if role == Role.REPLICATE or not ranges:
        whole = nbytes(w) + nbytes(b)
        return ModuleSpec(name, role, kind, reason, weight_shape=tuple(w.shape),
                          nbytes=(whole,) * tp)
    full = w.shape[split_dim(kind, split)]
    per_row = w.numel() // full * w.element_size()
    sizes = []
    for rk in ranges:
        local = ranges_len(rk)
        bias = 0
        if b is not None:
            bias = local * b.element_size() if split == Split.OUT else nbytes(b)
        sizes.append(local * per_row + bias)
    return ModuleSpec(name, role, kind, reason, split=split, full=full, ranges=tuple(ranges),
                      layout=layout, group=group, weight_shape=tuple(w.shape),
                      nbytes=tuple(sizes))
