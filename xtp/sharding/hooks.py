"""Hooks a sharded model needs besides its layers' collectives.

* :func:`head_slicing_hook`: a forward pre-hook cutting a per-head keyword input (Bloom's ALiBi
  bias) down to this rank's heads;
* :func:`partial_grad_hook`: sums the partial gradient of a replicated parameter that sees
  sharded activations (per-head q/k norms) over the TP group;
* :func:`shared_rows_grad_hook` / :func:`register_split_grad_hooks`: rows held by several ranks
  (replicated KV heads) get their gradient summed; a bias only rank 0 holds keeps a zero
  gradient elsewhere.
"""

from __future__ import annotations

import torch

from ..accelerators import Communicator
from ..planning.spec import ParamSplit, ShardPlan


def head_slicing_hook(kwarg: str, layout: str, heads: tuple[int, int], num_heads: int):
    """A forward pre-hook that cuts keyword input ``kwarg`` down to heads ``[start, stop)``.

    Layout ``batch_x_heads``: ``(batch * num_heads, ...)`` -> ``(batch * local_heads, ...)``;
    ``heads_dim0``: ``(num_heads, ...)`` -> ``(local_heads, ...)``; ``heads_dim1``: ``(batch,
    num_heads, ...)`` -> ``(batch, local_heads, ...)``. A tensor whose dimension does not have
    ``num_heads`` entries (broadcast over the heads, or already cut) is left as it is.
    """
    start, stop = heads
    if layout not in ("batch_x_heads", "heads_dim0", "heads_dim1"):
        raise ValueError(f"unknown head-sliced layout {layout!r}")

    def hook(module, args, kwargs):
        t = kwargs.get(kwarg)
        if not isinstance(t, torch.Tensor):
            return None
        if layout in ("heads_dim0", "heads_dim1"):
            dim = int(layout[-1])
            if t.dim() <= dim or t.shape[dim] != num_heads:
                return None
            kwargs[kwarg] = t.narrow(dim, start, stop - start)
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


def register_split_grad_hooks(plan: ShardPlan, modules: dict, comm: Communicator, rank: int,
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
