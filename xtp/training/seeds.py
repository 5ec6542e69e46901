"""Seeding a tp x dp world: the ranks of one TP group agree, data-parallel replicas differ."""

from __future__ import annotations

from ..distributed.context import TPContext


def seed_everything(seed: int, ctx: TPContext) -> None:
    """Seed so that ranks of one TP group draw the same random numbers (dropout on replicated
    activations must agree) and data-parallel replicas draw different ones."""
    ctx.accelerator.manual_seed_all(seed + 1000003 * ctx.dp_rank)
