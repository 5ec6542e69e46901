"""xtp's own fp32 GEMV kernel for one-token CPU decode (:class:`GemvLinear`).

At decode a linear layer multiplies one row by its weight, a matrix-vector product whose time
is the time to read the weight. torch's CPU ``F.linear`` in fp32 goes to MKL's GEMV, which on
the 2-core AMD EPYC VM of bench/RESULTS.md reads a decode-sized weight at ~17 GB/s on one core;
xtp's kernel (``accelerators/csrc/cpu_gemv.c``: eight rows at a time, one AVX-512 or AVX2
accumulator each) reads it at ~23-24 GB/s on the same core, while ``Tensor.sum`` reaches
~30 GB/s. The kernel is a C extension built at install time (``setup.py``, optional: no
compiler, no kernel) and needs no torch headers; the instruction set is picked when it is
imported (:func:`kernel_isa`).

:class:`GemvLinear` keeps the plain weight (no copy, no other layout: ``unpack()`` returns it)
and uses the kernel when the call is one it serves: the input holds a single row, the rank
computes with one thread (``torch.get_num_threads() == 1``, as xtp runs tp ranks that share the
cores, :mod:`cpu_threads`; with more threads MKL's parallel GEMV is used) and no gradient is
recorded. Everything else (prefill, batches) is ``F.linear`` on the same weight. Results differ
from ``F.linear``'s only by rounding (a different summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packed_linear import PackedLinear

try:
    from . import _cpu_gemv as _kernel
except ImportError as exc:  # not built: no C compiler at install, or an unsupported platform
    _kernel = None
    _WHY = f"the compiled kernel is not installed ({exc})"
else:
    _WHY = "" if _kernel.isa() else ("it needs an x86-64 CPU with AVX-512 or AVX2 and FMA; "
                                     "this one has neither")


def kernel_isa() -> str:
    """The instruction set the kernel uses on this CPU (``"avx512"`` or ``"avx2"``), or ``""``
    when there is no kernel here (:func:`unavailable_reason` says why)."""
    return _kernel.isa() if _kernel is not None else ""


def unavailable_reason() -> str:
    """Why the kernel cannot be used here, or ``""`` when it can."""
    return _WHY


class GemvLinear(PackedLinear):
    """An fp32 CPU weight ``(out_features, in_features)``, row-major, whose one-row products
    go to xtp's GEMV kernel. Raises ``ValueError`` for any other weight, ``RuntimeError``
    where the kernel is not available (:func:`unavailable_reason`)."""

    def __init__(self, weight: torch.Tensor) -> None:
        if _WHY:
            raise RuntimeError(f"xtp's GEMV kernel is not available: {_WHY}")
        if (weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2
                or not weight.is_contiguous()):
            raise ValueError("GemvLinear takes a contiguous 2-D float32 CPU weight, got "
                             f"{weight.dtype} {tuple(weight.shape)} on {weight.device}"
                             f"{'' if weight.is_contiguous() else ' (not contiguous)'}")
        self.shape, self.dtype, self.device = weight.shape, weight.dtype, weight.device
        self._weight = weight.detach()

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        out_features, in_features = self.shape
        if (x.numel() != in_features or x.shape[-1] != in_features
                or torch.get_num_threads() != 1
                or (torch.is_grad_enabled() and (x.requires_grad or (
                    bias is not None and bias.requires_grad)))
                or (bias is not None and (bias.dtype != torch.float32
                                          or bias.device.type != "cpu"))):
            return F.linear(x, self._weight, bias)
        x = x.contiguous()
        y = torch.empty((*x.shape[:-1], out_features), dtype=torch.float32)
        b = None if bias is None else bias.detach().contiguous()
        _kernel.gemv(self._weight.data_ptr(), x.data_ptr(), None if b is None else b.data_ptr(),
                     y.data_ptr(), out_features, in_features)
        return y

    def unpack(self) -> torch.Tensor:
        return self._weight

    @property
    def nbytes(self) -> int:
        return self._weight.numel() * self._weight.element_size()
