"""``xtp.plan(model_or_config, tp_size)``: the plan, without touching any weight."""

from __future__ import annotations

from torch import nn

from ..models.build import meta_model
from .derive import derive_plan
from .spec import ShardPlan


def plan(model_or_config, tp_size: int, rules: dict[str, str] | None = None,
         model_class: type | None = None) -> ShardPlan:
    """The :class:`ShardPlan` for a model (or a transformers config, built on the meta device
    at no weight cost) at ``tp_size`` ranks. ``print()`` it for a table."""
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
    else:
        model = meta_model(model_or_config, model_class)
    return derive_plan(model, tp_size, rules)
