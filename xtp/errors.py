"""Typed exceptions of the xtp core. Every message says what is wrong and how to fix it."""

from __future__ import annotations

from .accelerators.errors import (
    XtpError,
)


class DistributedSetupError(XtpError):
    """The process group or the TP/DP layout could not be set up."""


class TPSizeError(XtpError, ValueError):
    """A tp_size this model or this world cannot take; the message lists sizes that work."""


class PlanError(XtpError):
    """The planner could not derive a plan (a module it cannot classify, a bad rule...)."""


class UnclassifiedModuleError(PlanError):
    """A module whose role the planner cannot derive; the message shows the rule to add."""


class RuleError(PlanError, ValueError):
    """A user rule that matches nothing or names an unknown role."""


class AlreadyShardedError(XtpError):
    """``shard()`` on a model that is already sharded."""


class CheckpointError(XtpError):
    """A checkpoint is missing a tensor, has an extra one, a wrong shape or is damaged."""


class RanksDisagreeError(XtpError):
    """Ranks of one TP group were given different models, sizes, plans or software versions."""


class PackedWeightsError(XtpError):
    """An operation that needs dense weights (training, saving) on a model whose linear
    weights are packed for inference (:func:`xtp.pack_for_inference`)."""
