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


class ShardedForwardError(PlanError):
    """A plan whose local shapes the model's own forward cannot run (found at shard time on
    fake tensors, before the model is touched); the message names the rank, the module and the
    rule that keeps that part replicated."""


class AlreadyShardedError(XtpError):
    """``shard()`` on a model that is already sharded."""


class ArgumentError(XtpError, ValueError):
    """An argument of a public function or ``xtp`` command with a wrong type or value (a tp
    size that is not a positive integer, a dtype that is not a torch dtype, a path that does
    not exist); the message names the argument and the values that work."""


class CheckpointError(XtpError):
    """A checkpoint is missing a tensor, has an extra one, a wrong shape or is damaged."""


class ConfigError(CheckpointError, ValueError):
    """A model config (``config.json``, a config JSON file, a config object) that cannot be read,
    is not valid JSON, names an unknown ``model_type``, or that transformers or xtp rejects
    (head counts that are not positive integers, sizes that do not divide); the message names
    the file and the field. A ``CheckpointError`` because a folder's config is part of it."""


class NotPreshardedError(CheckpointError):
    """A folder given where a pre-sharded folder (``xtp preshard``, :func:`xtp.save_sharded`)
    is expected is not one: it has no ``xtp_metadata.json``."""


class RanksDisagreeError(XtpError):
    """Ranks of one TP group were given different models, sizes, plans or software versions."""


class PackedWeightsError(XtpError):
    """An operation that needs dense weights (training, saving) on a model whose linear
    weights are packed for inference (:func:`xtp.pack_for_inference`)."""
