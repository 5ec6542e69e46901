"""The packed-weight matmul as a torch custom op, so ``torch.compile`` keeps packed layers
inside its graph.

A packed weight (:class:`~xtp.accelerators.packed.base.PackedLinear`, e.g. oneDNN's opaque
blocked tensor on CPU) is nothing inductor can lower. Eagerly, :func:`packed_linear` calls
``packed.matmul`` directly; while ``torch.compile`` traces it emits ``xtp::packed_linear``,
an opaque op with a known output shape, which calls the same ``matmul`` at run time. The
packed weight is named by an integer handle (:func:`handle`,
:mod:`xtp.accelerators.op_handles`), assigned when the weight is packed.

Shapes: ``x`` ``(..., in_features)``, ``bias`` ``(out_features,)`` or None ->
``(..., out_features)``.
"""

from __future__ import annotations

import torch

from ..op_handles import HandleTable
from .base import PackedLinear

_PACKED = HandleTable("_xtp_op_handle", "packed weight")


def handle(packed: PackedLinear) -> int:
    """The integer that names ``packed`` in the custom op (assigned on the first call)."""
    return _PACKED.handle(packed)


@torch.library.custom_op("xtp::packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, weight: int, bias: torch.Tensor | None) -> torch.Tensor:
    return _PACKED.get(weight).matmul(x, bias)


@_packed_linear_op.register_fake
def _(x: torch.Tensor, weight: int, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _PACKED.get(weight).shape[0]))


def packed_linear(packed: PackedLinear, x: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` through ``packed``; the ``xtp::packed_linear`` op under
    ``torch.compile``."""
    if torch.compiler.is_compiling():
        return torch.ops.xtp.packed_linear(x, handle(packed), bias)
    return packed.matmul(x, bias)
