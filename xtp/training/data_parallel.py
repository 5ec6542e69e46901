"""Gradients across the data-parallel replicas of a tp x dp world."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..accelerators.comm.failures import guarded
from ..distributed.context import TPContext


def all_reduce_dp_gradients(model: nn.Module, ctx: TPContext) -> None:
    """Average gradients over the data-parallel group (a minimal stand-in for DDP/FSDP2 on the
    dp dimension of a tp x dp world). Collective on every rank of the dp group: a replica that
    died or hangs raises :class:`~xtp.accelerators.errors.CollectiveError` /
    :class:`~xtp.accelerators.errors.CollectiveTimeoutError` naming it (within
    ``XTP_TIMEOUT``) on the others."""
    if ctx.dp_size == 1:
        return
    with guarded("the data-parallel gradient all-reduce", ctx.dp_group):
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=ctx.dp_group)
                p.grad /= ctx.dp_size
