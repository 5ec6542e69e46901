"""Checks of plain arguments every public function and ``xtp`` command shares: tp sizes, paths,
dtypes. Each raises a typed error naming the argument and the values that work, before anything
starts (no process group, no file written). Configs are checked in :mod:`xtp.models.config`."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ArgumentError, TPSizeError


def check_tp_size(tp_size, name: str = "tp_size") -> int:
    """``tp_size`` when it is a positive int (not a bool); TPSizeError otherwise."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise TPSizeError(f"{name} must be a positive integer, got {tp_size!r}")
    return tp_size


def check_path(path, name: str) -> Path:
    """``path`` as a Path when it is a str or os.PathLike; ArgumentError otherwise."""
    if isinstance(path, (str, os.PathLike)) and str(path):
        return Path(path)
    raise ArgumentError(f"{name} must be a local path (str or os.PathLike), got {path!r}")


def check_dtype(dtype, name: str = "dtype"):
    """A floating-point ``torch.dtype`` for ``dtype`` (a dtype or its name; ``None`` stays
    ``None``); ArgumentError naming the argument otherwise."""
    if dtype is None:
        return None
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(found, torch.dtype):
        raise ArgumentError(f"{name} {dtype!r} is not a torch dtype; use e.g. bfloat16, "
                            "float16, float32")
    if not found.is_floating_point:
        raise ArgumentError(f"{name} {dtype!r} is not a floating-point dtype (weights are "
                            "stored and loaded as one); use e.g. bfloat16, float16, float32")
    return found


def check_model(model, name: str = "model"):
    """``model`` when it is a ``torch.nn.Module``; ArgumentError otherwise."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise ArgumentError(f"{name} must be a torch.nn.Module, got {type(model).__name__}; load "
                            "or build the model first (a folder: xtp.from_pretrained(path))")
    return model


def check_rules(rules):
    """``rules`` when it is None or a ``{glob: role}`` dict of strings; ArgumentError
    otherwise (which globs match and which roles exist is the planner's check)."""
    if rules is None or (isinstance(rules, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in rules.items())):
        return rules
    raise ArgumentError(f"rules must be a dict {{glob: role}} of strings, e.g. "
                        f"{{'model.layers.*.mlp.*': 'replicate'}}; got {rules!r}"[:300])
