"""A :class:`~xtp.planning.spec.ShardPlan` as JSON and back, and its fingerprint.

The encoding is generic over the plan's dataclasses (``{"__dc__": class name, field: value}``;
tuples as lists), so fields added to :mod:`xtp.planning.spec` later are carried without
changes here.
``plan_from_json(plan_to_json(p)) == p``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from . import spec
from .spec import ShardPlan


def _encode(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {"__dc__": type(value).__name__}
        for f in dataclasses.fields(value):
            if f.name.startswith("_"):
                continue
            out[f.name] = _encode(getattr(value, f.name))
        return out
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a plan")


def _decode(value):
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict):
        if "__dc__" in value:
            cls = getattr(spec, value["__dc__"])
            known = {f.name for f in dataclasses.fields(cls)}
            kwargs = {k: _decode(v) for k, v in value.items() if k in known}
            return cls(**kwargs)
        return {k: _decode(v) for k, v in value.items()}
    return value


def plan_to_json(plan: ShardPlan) -> dict:
    """A JSON-able dict that :func:`plan_from_json` turns back into an equal plan."""
    return _encode(plan)


def plan_from_json(data: dict) -> ShardPlan:
    plan = _decode(data)
    if not isinstance(plan, ShardPlan):
        raise ValueError("not an encoded ShardPlan")
    return plan


def fingerprint(plan: ShardPlan) -> str:
    """A short stable hash of everything in the plan (sha256 of its canonical JSON)."""
    raw = json.dumps(plan_to_json(plan), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]
