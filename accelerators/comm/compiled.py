"""The TP collectives as torch custom ops, so ``torch.compile`` keeps them inside its graph.

Eagerly, the layers call their :class:`Communicator` directly (no dispatcher in the way). While
``torch.compile`` traces, :func:`all_reduce` and :func:`all_gather` instead emit the custom ops
``xtp::all_reduce`` and ``xtp::all_gather``: dynamo sees an opaque op with a known output shape
(the fake implementations below) rather than the communicator's Python (shared-memory
protocol, gloo calls), which it cannot trace and would split the graph at, once per sharded
layer. At run time the compiled code calls the op, which calls the same communicator.

Ops take tensors and plain values only, so a communicator is named by an integer handle
(:func:`handle`, :mod:`xtp.accelerators.op_handles`).

Shapes: ``all_reduce(x)`` -> ``x.shape``; ``all_gather(x, dim, sizes)`` -> ``x.shape`` with
``sizes`` summed along ``dim`` (``world * x.shape[dim]`` when ``sizes`` is empty).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..op_handles import HandleTable
from .base import Communicator

_COMMS = HandleTable("_xtp_op_handle", "communicator")


def handle(comm: Communicator) -> int:
    """The integer that names ``comm`` in the custom ops (assigned on the first call)."""
    return _COMMS.handle(comm)


@torch.library.custom_op("xtp::all_reduce", mutates_args=())
def _all_reduce_op(x: torch.Tensor, comm: int) -> torch.Tensor:
    return _COMMS.get(comm).all_reduce(x.clone())


@_all_reduce_op.register_fake
def _(x: torch.Tensor, comm: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("xtp::all_gather", mutates_args=())
def _all_gather_op(x: torch.Tensor, comm: int, dim: int, sizes: list[int]) -> torch.Tensor:
    return _COMMS.get(comm).all_gather(x, dim, sizes or None)


@_all_gather_op.register_fake
def _(x: torch.Tensor, comm: int, dim: int, sizes: list[int]) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = sum(sizes) if sizes else shape[dim] * _COMMS.get(comm).world_size
    return x.new_empty(shape)


def all_reduce(comm: Communicator, x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ``comm``'s group. Eagerly in place (returns ``x``); under
    ``torch.compile`` a new tensor from the ``xtp::all_reduce`` op."""
    if torch.compiler.is_compiling():
        return torch.ops.xtp.all_reduce(x, handle(comm))
    return comm.all_reduce(x)


def all_gather(comm: Communicator, x: torch.Tensor, dim: int,
               sizes: Sequence[int] | None) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` (``dim`` >= 0); ``xtp::all_gather`` under
    ``torch.compile``."""
    if torch.compiler.is_compiling():
        return torch.ops.xtp.all_gather(x, handle(comm), dim, list(sizes or ()))
    return comm.all_gather(x, dim, sizes)
