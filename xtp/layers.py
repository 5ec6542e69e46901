"""Tensor-parallel behaviour for existing modules, applied by swapping the module's class.

``shard()`` keeps every module object (so hooks, attribute names and ``isinstance`` checks keep
working) and swaps its class for a subclass that adds the collective its role needs:

===================  ==========================================================================
role                 forward on this rank
===================  ==========================================================================
column               ``y_local = x @ W_local.T + b_local``; no collective (input grad is
                     all-reduced in backward)
row                  ``y = all_reduce(x_local @ W_local.T) + b``; bias added once, after the sum
vocab_embedding      rows outside this rank's vocabulary range give 0; ``all_reduce`` of the sum
lm_head              ``all_gather`` of the local vocabulary slice of the logits along the last dim
head_embedding       the per-head bias table keeps this rank's head columns; no collective
===================  ==========================================================================

Shapes: ``x`` is ``(..., in_features)`` (local in-features for row layers); outputs are
``(..., out_features)`` (local out-features for column layers).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .accelerators import Communicator, copy_to_group, gather_from_group, reduce_from_group
from .plan import (
    COLUMN,
    EMBEDDING,
    EXPERTS,
    HEAD_EMBEDDING,
    IN_OUT,
    LM_HEAD,
    OUT_IN,
    ROW,
    VOCAB_EMBEDDING,
)


class TPModule:
    """Marker base of every xtp-sharded module. ``tp_comm`` is the TP group's Communicator;
    ``tp_role`` the role; ``tp_local_range`` / ``tp_sizes`` describe the split dimension."""

    tp_role: ClassVar[str] = ""
    tp_comm: Communicator
    tp_original_class: type


def _matmul_no_bias(module: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == OUT_IN:
        return F.linear(x, module.weight)
    w = module.weight  # IN_OUT (Conv1D): (in, out)
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[1])


class ColumnParallel(TPModule):
    tp_role = COLUMN

    def forward(self, x, *args, **kwargs):
        return super().forward(copy_to_group(x, self.tp_comm), *args, **kwargs)


class RowParallel(TPModule):
    tp_role = ROW
    tp_kind: str = OUT_IN

    def forward(self, x):
        out = reduce_from_group(_matmul_no_bias(self, self.tp_kind, x), self.tp_comm)
        return out if self.bias is None else out + self.bias


class ParallelLMHead(TPModule):
    """``tp_gather_output=False`` (see :func:`xtp.training.local_logits`) returns this rank's
    vocabulary slice of the logits, for a vocab-parallel loss with no full-vocabulary tensor."""

    tp_role = LM_HEAD
    tp_sizes: tuple[int, ...] = ()
    tp_gather_output: bool = True

    def forward(self, x, *args, **kwargs):
        local = super().forward(copy_to_group(x, self.tp_comm), *args, **kwargs)
        if not self.tp_gather_output:
            return local
        return gather_from_group(local, self.tp_comm, -1, self.tp_sizes)


class VocabParallelEmbedding(TPModule):
    tp_role = VOCAB_EMBEDDING
    tp_vocab_start: int = 0

    def forward(self, ids, *args, **kwargs):
        local = ids - self.tp_vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = super().forward(local.masked_fill(outside, 0), *args, **kwargs)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(out, self.tp_comm)


class HeadParallelEmbedding(TPModule):
    tp_role = HEAD_EMBEDDING


class ParallelExperts(TPModule):
    """Fused 3-D experts with the intermediate dimension split: every rank computes every
    routed expert on its slice, and one all-reduce sums the partial outputs."""

    tp_role = EXPERTS

    def forward(self, hidden_states, *args, **kwargs):
        out = super().forward(copy_to_group(hidden_states, self.tp_comm), *args, **kwargs)
        return reduce_from_group(out, self.tp_comm)


MIXINS: dict[str, type] = {
    COLUMN: ColumnParallel, ROW: RowParallel, LM_HEAD: ParallelLMHead,
    VOCAB_EMBEDDING: VocabParallelEmbedding, HEAD_EMBEDDING: HeadParallelEmbedding,
    EXPERTS: ParallelExperts,
}
_classes: dict[tuple[type, type], type] = {}


def parallel_class(role: str, base: type) -> type:
    """The (cached) subclass of ``base`` with the behaviour of ``role``."""
    mixin = MIXINS[role]
    key = (mixin, base)
    if key not in _classes:
        _classes[key] = type(f"{mixin.__name__}{base.__name__}", (mixin, base), {
            "__module__": __name__, "tp_original_class": base,
        })
    return _classes[key]


def set_local_features(module: nn.Module, kind: str) -> None:
    """Make size attributes agree with the (already replaced) local weight."""
    w = getattr(module, "weight", None)
    if kind == OUT_IN:
        module.out_features, module.in_features = w.shape[0], w.shape[1]
    elif kind == IN_OUT:
        module.nf = w.shape[1]
        if hasattr(module, "nx"):
            module.nx = w.shape[0]
    elif kind == EMBEDDING:
        module.num_embeddings, module.embedding_dim = w.shape[0], w.shape[1]


def unshard_class(module: nn.Module) -> None:
    """Restore a module's original class (used when a shard() must be rolled back)."""
    if isinstance(module, TPModule):
        module.__class__ = module.tp_original_class


def head_slicing_hook(kwarg: str, layout: str, heads: tuple[int, int], num_heads: int):
    """A forward pre-hook that cuts keyword input ``kwarg`` down to heads ``[start, stop)``.

    Layout ``batch_x_heads``: ``(batch * num_heads, ...)`` -> ``(batch * local_heads, ...)``;
    ``heads_dim1``: ``(batch, num_heads, ...)`` -> ``(batch, local_heads, ...)``.
    """
    start, stop = heads
    if layout not in ("batch_x_heads", "heads_dim1"):
        raise ValueError(f"unknown head-sliced layout {layout!r}")

    def hook(module, args, kwargs):
        t = kwargs.get(kwarg)
        if not isinstance(t, torch.Tensor):
            return None
        if layout == "heads_dim1":
            if t.dim() < 2 or t.shape[1] != num_heads:
                return None
            kwargs[kwarg] = t[:, start:stop]
            return args, kwargs
        if t.shape[0] % num_heads:
            return None
        batch = t.shape[0] // num_heads
        local = t.reshape(batch, num_heads, *t.shape[1:])[:, start:stop]
        kwargs[kwarg] = local.reshape(batch * (stop - start), *t.shape[1:])
        return args, kwargs

    return hook


def partial_grad_hook(comm: Communicator):
    """A tensor hook that sums a replicated parameter's partial gradient over the TP group."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(grad.clone())

    return hook
