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
head_params          the module (attention) keeps its per-head parameters' local heads; no
                     collective
norm                 per-token norm over a pair's inner features: local weight (and bias)
                     slice; ``all_reduce`` of the per-token sum of squares (layer norm: of the
                     sum, then of the squared deviations), divided by the full width
===================  ==========================================================================

Shapes: ``x`` is ``(..., in_features)`` (local in-features for row layers); outputs are
``(..., out_features)`` (local out-features for column layers). A padded pair's column writes
its local features into a full-width output (zeros elsewhere) and its row reads only its own
features of a full-width input (:attr:`~xtp.planning.spec.ModuleSpec.padded`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..accelerators import Communicator, copy_to_group, gather_from_group, reduce_from_group
from ..errors import PlanError
from ..planning.norms import norm_kind
from ..planning.spec import ModuleSpec, Role, WeightKind
from .packing import packed_matmul
from .rng import RegionRNG


class TPModule:
    """Base of every xtp-sharded module's class. ``tp_comm``: the TP group's Communicator;
    ``tp_role``: the role; ``tp_kind``: how a linear layer stores its weight;
    ``tp_original_class``: the class before the swap. Each role's subclass below adds the
    ``tp_*`` attributes its forward reads, in :meth:`tp_setup`."""

    tp_role: ClassVar[str] = ""
    tp_comm: Communicator
    tp_original_class: type

    def tp_setup(self, spec: ModuleSpec, tp_size: int, rank: int, rng: RegionRNG) -> None:
        """Set this rank's attributes once the class is swapped and the local weights are in
        place; each role adds what its forward needs (``rng`` is the model's one
        :class:`~xtp.sharding.rng.RegionRNG`)."""
        if spec.kind in (WeightKind.OUT_IN, WeightKind.IN_OUT):
            self.tp_kind = spec.kind
        set_local_features(self, spec.kind)


def _matmul_no_bias(module: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    packed = packed_matmul(module, x, None)
    if packed is not None:
        return packed
    if kind == WeightKind.OUT_IN:
        return F.linear(x, module.weight)
    w = module.weight  # IN_OUT (Conv1D): (in, out)
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[1])


def _padded(spec: ModuleSpec, rank: int) -> tuple[int, tuple[tuple[int, int], ...]] | None:
    """(full width, this rank's ranges) of a padded pair's layer, else None."""
    return (spec.full, spec.ranges[rank]) if spec.padded else None


class ColumnParallel(TPModule):
    tp_role = Role.COLUMN
    tp_rng: RegionRNG | None = None
    tp_pad: tuple[int, tuple[tuple[int, int], ...]] | None = None

    def tp_setup(self, spec, tp_size, rank, rng) -> None:
        super().tp_setup(spec, tp_size, rank, rng)
        self.tp_rng = rng
        self.tp_pad = _padded(spec, rank)

    def forward(self, x, *args, **kwargs):
        x = copy_to_group(x, self.tp_comm)
        out = packed_matmul(self, x, self.bias)
        if out is None:
            out = super().forward(x, *args, **kwargs)
        if self.tp_pad is not None:  # (..., local) -> (..., full): own features, zeros elsewhere
            (width, ranges), at = self.tp_pad, 0
            padded = out.new_zeros(*out.shape[:-1], width)
            for a, b in ranges:
                padded[..., a:b] = out[..., at:at + b - a]
                at += b - a
            out = padded
        if self.training and self.tp_rng is not None:
            self.tp_rng.enter(out.device)
        return out


class RowParallel(TPModule):
    tp_role = Role.ROW
    tp_kind: str = WeightKind.OUT_IN
    tp_rng: RegionRNG | None = None

    tp_pad: tuple[int, tuple[tuple[int, int], ...]] | None = None

    def tp_setup(self, spec, tp_size, rank, rng) -> None:
        super().tp_setup(spec, tp_size, rank, rng)
        self.tp_rng = rng
        self.tp_pad = _padded(spec, rank)

    def forward(self, x):
        if self.training and self.tp_rng is not None:
            self.tp_rng.leave()
        if self.tp_pad is not None:  # (..., full) -> (..., local): only this rank's features
            x = torch.cat([x[..., a:b] for a, b in self.tp_pad[1]], dim=-1)
        out = reduce_from_group(_matmul_no_bias(self, self.tp_kind, x), self.tp_comm)
        return out if self.bias is None else out + self.bias


class ParallelLMHead(TPModule):
    """``tp_gather_output=False`` (see :func:`xtp.training.local_logits`) returns this rank's
    vocabulary slice of the logits, for a vocab-parallel loss with no full-vocabulary tensor."""

    tp_role = Role.LM_HEAD
    tp_sizes: tuple[int, ...] = ()
    tp_gather_output: bool = True

    def tp_setup(self, spec, tp_size, rank, rng) -> None:
        super().tp_setup(spec, tp_size, rank, rng)
        self.tp_sizes = tuple(spec.local_extent(r) for r in range(tp_size))

    def forward(self, x, *args, **kwargs):
        x = copy_to_group(x, self.tp_comm)
        local = packed_matmul(self, x, self.bias)
        if local is None:
            local = super().forward(x, *args, **kwargs)
        if not self.tp_gather_output:
            return local
        return gather_from_group(local, self.tp_comm, -1, self.tp_sizes)


class VocabParallelEmbedding(TPModule):
    tp_role = Role.VOCAB_EMBEDDING
    tp_vocab_start: int = 0

    def tp_setup(self, spec, tp_size, rank, rng) -> None:
        super().tp_setup(spec, tp_size, rank, rng)
        self.tp_vocab_start = spec.ranges[rank][0][0]
        if getattr(self, "padding_idx", None) is not None:
            local = self.padding_idx - self.tp_vocab_start
            self.padding_idx = local if 0 <= local < self.weight.shape[0] else None

    def forward(self, ids, *args, **kwargs):
        local = ids - self.tp_vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = super().forward(local.masked_fill(outside, 0), *args, **kwargs)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(out, self.tp_comm)


class HeadParallelEmbedding(TPModule):
    tp_role = Role.HEAD_EMBEDDING


class HeadParams(TPModule):
    """A pair's enclosing module holding per-head (or per-feature) parameters of the pair's
    heads, e.g. attention sinks: it keeps this rank's slice; its forward is unchanged."""

    tp_role = Role.HEAD_PARAMS


class ParallelNorm(TPModule):
    """A per-token norm (:mod:`xtp.planning.norms`) on ``(..., local width)`` activations of a
    pair split by features: this rank's weight and bias slices; mean statistics over the full
    width from per-rank sums, all-reduced (forward and backward: every rank's outputs depend
    on every rank's inputs)."""

    tp_role = Role.NORM

    def tp_setup(self, spec, tp_size, rank, rng) -> None:
        super().tp_setup(spec, tp_size, rank, rng)
        self.tp_width = spec.full
        self.tp_norm = norm_kind(_full_width(self, spec.full), spec.full)
        if self.tp_norm is None:
            raise PlanError(f"{spec.name}: its forward is no per-token norm xtp can split; "
                            "re-plan it with this version of the model code")

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        total = reduce_from_group(t.sum(-1, keepdim=True), self.tp_comm)
        return copy_to_group(total, self.tp_comm) / self.tp_width

    def forward(self, x, *args, **kwargs):
        n = self.tp_norm
        h = x.float()
        if n.kind == "layer":
            h = h - self._mean(h)
        h = h * torch.rsqrt(self._mean(h.pow(2)) + n.eps)
        out = (self.weight + n.offset) * h.to(x.dtype)
        return out + self.bias if n.has_bias else out


def _full_width(module: nn.Module, width: int) -> nn.Module:
    """A shallow twin of ``module`` of its original class with parameters of ``width``
    entries (its full width before the split), for :func:`~xtp.planning.norms.norm_kind` to
    run its original forward on; ``module`` itself is untouched."""
    twin = nn.Module.__new__(module.tp_original_class)
    twin.__dict__.update({k: v for k, v in module.__dict__.items() if not k.startswith("tp_")})
    twin._parameters = {k: None if v is None else torch.empty(width)  # bias=False stays None
                        for k, v in module._parameters.items()}
    twin._buffers, twin._modules = dict(module._buffers), {}
    return twin


class ParallelExperts(TPModule):
    """Fused 3-D experts with the intermediate dimension split: every rank computes every
    routed expert on its slice, and one all-reduce sums the partial outputs.

    The output is a sum of per-rank partial outputs, so the gradient of *every* differentiable
    input (hidden states, and the routing weights the experts scale by) is partial on each
    rank: all of them go through ``copy_to_group`` (all-reduce in backward)."""

    tp_role = Role.EXPERTS

    def forward(self, hidden_states, *args, **kwargs):
        comm = self.tp_comm
        args = tuple(copy_to_group(a, comm) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: copy_to_group(v, comm) if isinstance(v, torch.Tensor) else v
                  for k, v in kwargs.items()}
        out = super().forward(copy_to_group(hidden_states, comm), *args, **kwargs)
        return reduce_from_group(out, comm)


MIXINS: dict[str, type] = {
    Role.COLUMN: ColumnParallel, Role.ROW: RowParallel, Role.LM_HEAD: ParallelLMHead,
    Role.VOCAB_EMBEDDING: VocabParallelEmbedding, Role.HEAD_EMBEDDING: HeadParallelEmbedding,
    Role.EXPERTS: ParallelExperts, Role.HEAD_PARAMS: HeadParams, Role.NORM: ParallelNorm,
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
    if kind == WeightKind.OUT_IN:
        module.out_features, module.in_features = w.shape[0], w.shape[1]
    elif kind == WeightKind.IN_OUT:
        module.nf = w.shape[1]
        if hasattr(module, "nx"):
            module.nx = w.shape[0]
    elif kind == WeightKind.EMBEDDING:
        module.num_embeddings, module.embedding_dim = w.shape[0], w.shape[1]
