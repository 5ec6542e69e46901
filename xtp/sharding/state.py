"""Where xtp keeps its state on a user's model: every attribute name, in one place.

On the model (the root module):

* ``_xtp_plan`` / ``_xtp_context``: the :class:`~xtp.planning.spec.ShardPlan` and the
  :class:`~xtp.distributed.context.TPContext` it was sharded with (:func:`mark_sharded`);
* ``_xtp_load_report``: what :func:`xtp.from_pretrained` read (:func:`xtp.load_report`);
* ``_xtp_packed_requires_grad`` / ``_xtp_packed_root_hook``: the ``requires_grad`` flags before
  :func:`xtp.pack_for_inference`, and its ``load_state_dict`` refusal on the root.

On a sharded module: ``tp_packed`` (its packed weight) and ``_xtp_packed_hooks`` (the hooks
that keep ``state_dict`` dense and refuse ``load_state_dict``); the ``tp_*`` attributes of the
layer classes are documented in :mod:`xtp.sharding.layers`.
"""

from __future__ import annotations

from torch import nn

PLAN_ATTR = "_xtp_plan"
CONTEXT_ATTR = "_xtp_context"
REPORT_ATTR = "_xtp_load_report"
PACKED_ATTR = "tp_packed"
PACKED_HOOKS_ATTR = "_xtp_packed_hooks"
PACKED_GRAD_FLAGS_ATTR = "_xtp_packed_requires_grad"
PACKED_ROOT_HOOK_ATTR = "_xtp_packed_root_hook"


def sharded_plan(model: nn.Module):
    """The :class:`~xtp.planning.spec.ShardPlan` a model was sharded with, or ``None``."""
    return getattr(model, PLAN_ATTR, None)


def sharded_context(model: nn.Module):
    """The :class:`~xtp.distributed.context.TPContext` a model was sharded in, or ``None``."""
    return getattr(model, CONTEXT_ATTR, None)


def mark_sharded(model: nn.Module, plan, ctx) -> None:
    """Record on ``model`` the plan and context it is now sharded with."""
    setattr(model, PLAN_ATTR, plan)
    setattr(model, CONTEXT_ATTR, ctx)
