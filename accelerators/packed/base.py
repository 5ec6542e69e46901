"""Linear weights stored in a device's own fast layout, for inference (the ``PackedLinear``
interface an accelerator returns from :meth:`Accelerator.pack_linear_weight`).

A packed weight replaces a ``(out_features, in_features)`` weight: ``matmul(x, bias)`` computes
``x @ W.T + bias`` for ``x`` of shape ``(..., in_features)`` and returns
``(..., out_features)``; ``unpack()`` gives back the dense weight, bit for bit. Packed weights
have no backward: they serve inference only, and the core unpacks before anything else
(training, saving, moving) touches the weight.
"""

from __future__ import annotations

import abc

import torch


class PackedLinear(abc.ABC):
    """One linear weight in a device-specific layout. ``shape``/``dtype``/``device`` are the
    dense weight's."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``TypeError`` when ``x`` is not of the weight's dtype and device: a packed weight
        cannot follow ``model.to(...)``."""
        if x.dtype != self.dtype or x.device != self.device:
            raise TypeError(f"input ({x.dtype} on {x.device}) does not match the packed weight "
                            f"({self.dtype} on {self.device}); a packed model cannot be moved "
                            "or cast: xtp.unpack(model) first")

    @abc.abstractmethod
    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)``: ``(..., in_features)`` -> ``(..., out_features)``."""

    @abc.abstractmethod
    def unpack(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, equal bit for bit to the packed one."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes the packed weight holds."""
