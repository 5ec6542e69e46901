"""CPU linear weights prepacked in oneDNN's blocked layout, for fast inference matmuls.

torch's CPU ``F.linear`` in bf16 hands the plain ``(out, in)`` weight to oneDNN, which re-blocks
it on every call; at decode (one token: a matrix-vector product) that makes the call
compute-bound at ~10 GB/s per core. fp32 goes to MKL's GEMV, which streams the plain weight
near the memory bandwidth already. Prepacking once, with torch's own oneDNN ops
(``torch.ops.mkldnn``, part of every x86 CPU build of torch: nothing to compile), removes the
re-blocking: measured on a 2-core AMD EPYC VM (bench/RESULTS.md, same ranks, packed and dense
blocks interleaved) decode of a 0.85B Llama at tp 2 takes 0.73x the dense time in bf16.
Results equal ``F.linear``'s within rounding (bf16 bit for bit in our measurements);
``unpack()`` returns the original weight bit for bit.

Which dtypes are packed (:data:`DEFAULT_DTYPES`): bf16 and fp16. fp32 stays dense by default:
MKL's fp32 GEMV already streams the plain weight near the memory bandwidth, and packed fp32
measured anywhere from 0.96x to 1.10x the dense decode time on that VM (RESULTS.md), not worth
the packing copy at load. ``XTP_CPU_PACK`` chooses: ``1`` (default) bf16/fp16, ``all`` fp32
too, ``0`` nothing. A weight oneDNN cannot pack here (fp16 without the CPU instructions for it,
a torch build without oneDNN) is left dense, and so is a weight under :data:`MIN_BYTES`: the
packed call costs about 13 us more per call, which only a large enough matrix wins back (same
VM, one thread, one token: fp32 64x64 3.3x slower, 512x512 (1 MiB) even, 1024x512 0.81x; bf16
256x256 0.80x, 1024x1024 0.51x).
"""

from __future__ import annotations

import os

import torch

from .errors import AcceleratorError
from .packed_linear import PackedLinear

#: every dtype oneDNN can pack (``XTP_CPU_PACK=all``)
PACKABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: the dtypes packed by default: fp32 gains nothing measurable (see the module docstring)
DEFAULT_DTYPES = (torch.bfloat16, torch.float16)
ENV = "XTP_CPU_PACK"
MIN_BYTES = 1 << 20
_OFF, _ON, _ALL = ("0", "false", "off", "no"), ("", "1", "true", "on", "yes"), ("all",)


def env_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes ``XTP_CPU_PACK`` asks to pack: ``1``/unset -> :data:`DEFAULT_DTYPES`,
    ``all`` -> :data:`PACKABLE_DTYPES`, ``0`` -> none. Another value raises
    :class:`~xtp.accelerators.errors.AcceleratorError`."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value in _OFF:
        return ()
    if value in _ON:
        return DEFAULT_DTYPES
    if value in _ALL:
        return PACKABLE_DTYPES
    raise AcceleratorError(f"{ENV}={os.environ[ENV]!r} is not understood; use 1 (pack bf16 and "
                           "fp16 weights, the default), all (fp32 too) or 0 (no packing)")


def dtypes_to_pack(dtypes: tuple[torch.dtype, ...] | None = None) -> tuple[torch.dtype, ...]:
    """``dtypes`` (those oneDNN can pack), or :func:`env_dtypes` where ``dtypes`` is None;
    nothing at all when ``XTP_CPU_PACK=0``."""
    wanted = env_dtypes()
    if wanted and dtypes is not None:
        wanted = tuple(d for d in dtypes if d in PACKABLE_DTYPES)
    return wanted


def onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
                and hasattr(ops, "_linear_pointwise"))


class OneDNNPackedLinear(PackedLinear):
    """A CPU weight in oneDNN's blocked layout (packed for one-token batches, the decode case;
    larger batches work too)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.shape, self.dtype, self.device = weight.shape, weight.dtype, weight.device
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)

    # torch.compile never traces this: the core calls it through the xtp::packed_linear op
    # (compiled_packed_linear), since inductor cannot lower oneDNN's op on an opaque tensor
    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != self.dtype or x.device != self.device:
            raise TypeError(f"input ({x.dtype} on {x.device}) does not match the packed weight "
                            f"({self.dtype} on {self.device}); a packed model cannot be moved "
                            "or cast: xtp.unpack(model) first")
        if bias is not None:
            bias = bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")

    def unpack(self) -> torch.Tensor:
        return self._packed.to_dense()

    @property
    def nbytes(self) -> int:
        return self._packed.numel() * self._packed.element_size()


def pack_cpu_linear(weight: torch.Tensor, min_bytes: int = MIN_BYTES,
                    dtypes: tuple[torch.dtype, ...] | None = None) -> PackedLinear | None:
    """``weight`` packed for oneDNN, or ``None`` where that is off (``XTP_CPU_PACK=0``), its
    dtype is not in ``dtypes`` (default: what ``XTP_CPU_PACK`` asks for, :func:`env_dtypes`),
    unsupported, fails, or the weight is smaller than ``min_bytes``."""
    if (weight.dtype not in dtypes_to_pack(dtypes) or weight.device.type != "cpu"
            or weight.dim() != 2 or weight.numel() * weight.element_size() < min_bytes
            or not onednn_available()):
        return None
    try:
        return OneDNNPackedLinear(weight)
    except RuntimeError:  # e.g. fp16 on a CPU without avx512_fp16 / avx_ne_convert
        return None
