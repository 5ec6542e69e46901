"""Gradients across the data-parallel replicas of a tp x dp world."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..distributed.context import TPContext


def all_reduce_dp_gradients(model: nn.Module, ctx: TPContext) -> None:
    """Average gradients over the data-parallel group (a minimal stand-in for DDP/FSDP2 on the
    dp dimension of a tp x dp world)."""
    if ctx.dp_size == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=ctx.dp_group)
            p.grad /= ctx.dp_size
