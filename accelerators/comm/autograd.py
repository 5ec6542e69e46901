"""Autograd-aware collectives for tensor-parallel layers.

==========================  ============================  ==============================
function                    forward                       backward
==========================  ============================  ==============================
``copy_to_group``           identity                      all-reduce of the gradient
``reduce_from_group``       all-reduce (sum)              identity
``gather_from_group``       all-gather along ``dim``      this rank's slice of the grad
``scatter_to_group``        this rank's slice             all-gather of the gradient
==========================  ============================  ==============================

When autograd is not recording (inference, ``torch.no_grad()``), each function runs the bare
collective with no graph bookkeeping. Every function is a no-op when ``world_size == 1``.
Under ``torch.compile`` the collectives are custom ops (:mod:`xtp.accelerators.comm.compiled`), so
they stay inside the compiled graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Communicator
from .compiled import all_gather, all_reduce


def _needs_graph(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _own_slice(x: torch.Tensor, comm: Communicator, dim: int, sizes: Sequence[int] | None):
    total = x.shape[dim]
    if sizes is None:
        width = total // comm.world_size
        return x.narrow(dim, comm.rank * width, width)
    return x.narrow(dim, sum(sizes[: comm.rank]), sizes[comm.rank])


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(ctx.comm, grad.contiguous().clone()), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        return all_reduce(comm, x.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim, sizes):
        ctx.comm, ctx.dim, ctx.sizes = comm, dim, sizes
        return all_gather(comm, x, dim, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice(grad, ctx.comm, ctx.dim, ctx.sizes).contiguous(), None, None, None


class _ScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim, sizes):
        ctx.comm, ctx.dim, ctx.sizes = comm, dim, sizes
        return _own_slice(x, comm, dim, sizes).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return all_gather(ctx.comm, grad.contiguous(), ctx.dim, ctx.sizes), None, None, None


def copy_to_group(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Identity forward; sums the gradient over the group in backward."""
    if comm.world_size == 1 or not _needs_graph(x):
        return x
    return _CopyToGroup.apply(x, comm)


def reduce_from_group(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Sum over the group forward (in place when no graph is recorded); identity backward."""
    if comm.world_size == 1:
        return x
    if not _needs_graph(x):
        return all_reduce(comm, x)
    return _ReduceFromGroup.apply(x, comm)


def gather_from_group(
    x: torch.Tensor, comm: Communicator, dim: int = -1, sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """All-gather along ``dim`` forward; backward keeps this rank's slice of the gradient."""
    if comm.world_size == 1:
        return x
    dim = dim % x.dim()
    if not _needs_graph(x):
        return all_gather(comm, x, dim, sizes)
    return _GatherFromGroup.apply(x, comm, dim, None if sizes is None else tuple(sizes))


def scatter_to_group(
    x: torch.Tensor, comm: Communicator, dim: int = -1, sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """Keep this rank's slice along ``dim`` forward; backward all-gathers the gradient."""
    if comm.world_size == 1:
        return x
    dim = dim % x.dim()
    if not _needs_graph(x):
        return _own_slice(x, comm, dim, sizes).contiguous()
    return _ScatterToGroup.apply(x, comm, dim, None if sizes is None else tuple(sizes))
