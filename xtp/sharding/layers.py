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

import hashlib
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..accelerators import Communicator, copy_to_group, gather_from_group, reduce_from_group
from ..planning.spec import (
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
from .packing import packed_matmul


class TPModule:
    """Marker base of every xtp-sharded module. ``tp_comm`` is the TP group's Communicator;
    ``tp_role`` the role; ``tp_local_range`` / ``tp_sizes`` describe the split dimension."""

    tp_role: ClassVar[str] = ""
    tp_comm: Communicator
    tp_original_class: type


def _matmul_no_bias(module: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    packed = packed_matmul(module, x, None)
    if packed is not None:
        return packed
    if kind == OUT_IN:
        return F.linear(x, module.weight)
    w = module.weight  # IN_OUT (Conv1D): (in, out)
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[1])


def default_generator(device: torch.device) -> torch.Generator | None:
    """The default random generator of ``device`` (``None`` when its backend has none)."""
    if device.type == "cpu":
        return torch.default_generator
    try:
        mod = torch.get_device_module(device.type)
        gens = mod.default_generators
        return gens[device.index if device.index is not None else mod.current_device()]
    except (AttributeError, RuntimeError, IndexError):
        return None


class RegionRNG:
    """Random numbers drawn inside a tensor-parallel region (from a column layer's output to
    its row layer's input: activations split by heads or features, e.g. attention-probability
    dropout) come from a stream of their own, one per TP rank (Megatron-LM's model-parallel RNG).

    Without it every rank draws region randomness from the default generator, and ranks with
    different local head counts (6 heads over 4 ranks: 2, 2, 1, 1) consume different amounts
    of it; the dropout on replicated activations after the row layer then differs across the TP
    group (silently wrong training), and with equal counts the ranks' per-head masks are copies.

    One instance per sharded model (``tp_rng`` of its column and row layers); only in training
    mode. Entering (column layer) seeds the device's default generator from a hash of its state
    and the TP rank; leaving (row layer) puts the state back and, if the region drew anything,
    advances it by one draw (identically on every TP rank) so the next region gets another
    seed. Everything is a function of the default generator's state: seeding it
    (:func:`xtp.training.seed_everything`) seeds the regions, a checkpoint of it resumes them,
    and activation-checkpointing recomputation (which restores it) redraws the same masks. A
    region that draws nothing leaves the default stream exactly as the unsharded model's.
    Not under ``torch.compile`` tracing (region draws then come from the default stream).
    """

    def __init__(self, tp_rank: int) -> None:
        self.tp_rank = tp_rank
        self._inside: tuple | None = None

    def enter(self, device: torch.device) -> None:
        if self._inside is not None or torch.compiler.is_compiling():
            return
        gen = default_generator(device)
        if gen is None:
            return
        main = gen.get_state()
        digest = hashlib.blake2b(main.numpy().tobytes() + self.tp_rank.to_bytes(4, "little"),
                                 digest_size=8).digest()
        gen.manual_seed(int.from_bytes(digest, "little") >> 1)
        self._inside = (gen, main, gen.get_state())

    def leave(self) -> None:
        if self._inside is None:
            return
        gen, main, seeded = self._inside
        self._inside = None
        drew = not torch.equal(gen.get_state(), seeded)
        gen.set_state(main)
        if drew:
            torch.empty(1, device=gen.device).uniform_(generator=gen)


class ColumnParallel(TPModule):
    tp_role = COLUMN
    tp_rng: RegionRNG | None = None

    def forward(self, x, *args, **kwargs):
        x = copy_to_group(x, self.tp_comm)
        out = packed_matmul(self, x, self.bias)
        if out is None:
            out = super().forward(x, *args, **kwargs)
        if self.training and self.tp_rng is not None:
            self.tp_rng.enter(out.device)
        return out


class RowParallel(TPModule):
    tp_role = ROW
    tp_kind: str = OUT_IN
    tp_rng: RegionRNG | None = None

    def forward(self, x):
        if self.training and self.tp_rng is not None:
            self.tp_rng.leave()
        out = reduce_from_group(_matmul_no_bias(self, self.tp_kind, x), self.tp_comm)
        return out if self.bias is None else out + self.bias


class ParallelLMHead(TPModule):
    """``tp_gather_output=False`` (see :func:`xtp.training.local_logits`) returns this rank's
    vocabulary slice of the logits, for a vocab-parallel loss with no full-vocabulary tensor."""

    tp_role = LM_HEAD
    tp_sizes: tuple[int, ...] = ()
    tp_gather_output: bool = True

    def forward(self, x, *args, **kwargs):
        x = copy_to_group(x, self.tp_comm)
        local = packed_matmul(self, x, self.bias)
        if local is None:
            local = super().forward(x, *args, **kwargs)
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
    routed expert on its slice, and one all-reduce sums the partial outputs.

    The output is a sum of per-rank partial outputs, so the gradient of *every* differentiable
    input (hidden states, and the routing weights the experts scale by) is partial on each
    rank: all of them go through ``copy_to_group`` (all-reduce in backward)."""

    tp_role = EXPERTS

    def forward(self, hidden_states, *args, **kwargs):
        comm = self.tp_comm
        args = tuple(copy_to_group(a, comm) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: copy_to_group(v, comm) if isinstance(v, torch.Tensor) else v
                  for k, v in kwargs.items()}
        out = super().forward(copy_to_group(hidden_states, comm), *args, **kwargs)
        return reduce_from_group(out, comm)


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


def shared_rows_grad_hook(comm: Communicator, dim: int,
                          pieces: tuple[tuple[int, int, int], ...], shared: int):
    """A tensor hook for a split parameter whose rows are held by several ranks (KV heads
    replicated because there are fewer KV heads than ranks): each holder computes only its
    own query heads' part of those rows' gradient, so they are summed over the TP group.

    ``pieces``: ``(local_start, buffer_start, length)`` of this rank's shared rows along
    ``dim``; ``shared``: the number of distinct shared rows (equal on every rank, which all
    take part in the all-reduce, holders or not)."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        shape = list(grad.shape)
        shape[dim] = shared
        buf = grad.new_zeros(shape)
        for local, pos, n in pieces:
            buf.narrow(dim, pos, n).add_(grad.narrow(dim, local, n))
        buf = comm.all_reduce(buf)
        grad = grad.clone()
        for local, pos, n in pieces:
            grad.narrow(dim, local, n).copy_(buf.narrow(dim, pos, n))
        return grad

    return hook
