"""Per-token norms over a pair's inner features: which ones can be split with the pair.

A module between a pair's columns and its row (``norm(act(gate(x)) * up(x))`` before
``down``) whose parameters are as wide as the inner dimension would need every feature on one
rank. When its forward is a per-token norm over the last dimension (an RMS norm or a layer
norm, elementwise weight and bias), the pair can still be split exactly: each rank keeps its
slice of the weight (and bias) and the norm's statistics are summed over the ranks
(:class:`xtp.sharding.layers.ParallelNorm`).

What the forward computes is found by running it, never from the class or names:
:func:`norm_kind` calls the module's own forward (with random parameters of its own shapes, on
random inputs, one at a small scale so that ``eps`` shows) and compares it with the reference
formulas for each float attribute of the module as ``eps``. A module matching none stays whole.

Shapes: ``x`` is ``(..., width)``; the weight and bias are ``(width,)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NormKind:
    """``kind``: ``"rms"`` (``x / sqrt(mean(x^2) + eps)``) or ``"layer"`` (``(x - mean) /
    sqrt(var + eps)``), over the last dimension; the result times ``weight + offset`` (plus
    ``bias`` when the module has one)."""

    kind: str
    eps: float
    offset: float
    has_bias: bool


def reference(x: torch.Tensor, n: NormKind, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """The norm ``n`` of ``x`` over its whole last dimension, as the module computes it."""
    h = x.float()
    if n.kind == "layer":
        h = h - h.mean(-1, keepdim=True)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + n.eps)
    out = (weight + n.offset) * h.to(x.dtype)
    return out if bias is None else out + bias


def _candidates(module: nn.Module, has_bias: bool) -> list[NormKind]:
    eps = sorted({float(v) for v in vars(module).values()
                  if isinstance(v, float) and 0 < v < 1})
    return [NormKind(k, e, o, has_bias) for k in ("rms", "layer") for e in eps
            for o in (0.0, 1.0)]


def norm_kind(module: nn.Module, width: int) -> NormKind | None:
    """What ``module``'s forward computes on ``(..., width)`` inputs when it is a per-token norm
    over the last dimension with a ``(width,)`` weight and an optional ``(width,)`` bias; else
    ``None``. Runs the module's own forward (its class's, even once xtp swapped it) on CPU."""
    params = dict(module.named_parameters())
    if set(params) - {"weight", "bias"} or "weight" not in params or any(
            p.shape != (width,) for p in params.values()) or any(True for _ in module.buffers()):
        return None
    forward = getattr(module, "tp_original_class", type(module)).forward
    gen = torch.Generator().manual_seed(0)
    fake = {k: torch.randn(width, generator=gen) for k in params}
    inputs = [torch.randn(2, 3, width, generator=gen) * scale for scale in (1.0, 1e-3)]
    saved = dict(module._parameters)
    try:
        module._parameters.update(fake)
        with torch.no_grad():
            outs = [forward(module, x) for x in inputs]
    except Exception:  # noqa: BLE001 - a forward that cannot run this way is no norm xtp knows
        return None
    finally:
        module._parameters.clear()
        module._parameters.update(saved)
    if not all(isinstance(o, torch.Tensor) and o.shape == x.shape for o, x in zip(outs, inputs)):
        return None
    for cand in _candidates(module, "bias" in params):
        refs = [reference(x, cand, fake["weight"], fake.get("bias")) for x in inputs]
        if all(torch.allclose(o, r, rtol=1e-5, atol=1e-6) for o, r in zip(outs, refs)):
            return cand
    return None
