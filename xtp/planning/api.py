"""``xtp.plan(model_or_config, tp_size)``: the plan, without touching any weight."""

from __future__ import annotations

from torch import nn

from ..models.build import meta_model
from ..models.config import check_config
from ..models.inputs import check_rules, check_tp_size
from .derive import derive_plan
from .spec import ShardPlan


def plan(model_or_config, tp_size: int, rules: dict[str, str] | None = None,
         model_class: type | None = None, *, heads: int | None = None,
         kv_heads: int | None = None) -> ShardPlan:
    """The :class:`ShardPlan` for a model (or a transformers config, built on the meta device
    at no weight cost) at ``tp_size`` ranks. ``print()`` it for a table.

    ``heads``/``kv_heads``: the attention head counts, as for :func:`xtp.shard`, for a model
    whose config does not hold them and whose forward does not show them.

    Raises:
        TPSizeError: ``tp_size`` is not a positive integer, or the model cannot take it.
        ConfigError: ``model_or_config`` is neither a module nor a usable transformers config.
        PlanError: ``heads``/``kv_heads`` that do not group, or no head size to go with them.
    """
    if isinstance(tp_size, bool) or not isinstance(tp_size, int):
        check_tp_size(tp_size)  # the type; a size < 1 gets the planner's list of sizes that work
    check_rules(rules)
    if isinstance(model_or_config, nn.Module):
        model = model_or_config
    else:
        model = meta_model(check_config(model_or_config, "model_or_config"), model_class)
    return derive_plan(model, tp_size, rules, heads=heads, kv_heads=kv_heads)
