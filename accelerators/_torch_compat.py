"""Small helpers over torch APIs whose presence depends on the torch version."""

from __future__ import annotations

import importlib.util
import sys

import torch


def backend_available(name: str) -> bool:
    """True when torch.distributed can create a process group with backend ``name``."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    checker = getattr(dist, "is_backend_available", None)
    if checker is not None:
        return bool(checker(name))
    specific = getattr(dist, f"is_{name}_available", None)
    if specific is not None:
        return bool(specific())
    return name.upper() in dir(dist.Backend) or name in getattr(dist.Backend, "_plugins", {})


def module_installed(name: str) -> bool:
    """True when ``name`` could be imported, without importing it (or its parents' code)."""
    if name in sys.modules:
        return True
    top = name.split(".")[0]
    try:
        if importlib.util.find_spec(top) is None:
            return False
        return top == name or importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def device_module(device_type: str):
    """``torch.<device_type>`` or ``None`` when this torch has no such module."""
    return getattr(torch, device_type, None)
