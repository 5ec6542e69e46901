"""xtp's own GEMV kernel for one-token CPU decode: fp32 (:class:`GemvLinear`) and bf16
(:class:`Bf16GemvLinear`).

At decode a linear layer multiplies one row by its weight, a matrix-vector product whose time
is the time to read the weight. xtp's kernel (``accelerators/cpu/csrc/cpu_gemv.c``: eight rows
at a time, one AVX-512 or AVX2 accumulator each) reads it faster on one core than torch's CPU
``F.linear`` does (MKL's GEMV in fp32; measured speeds in bench/RESULTS.md). The kernel is a
C extension built at install time (``setup.py``, optional: no compiler, no kernel) and needs no
torch headers; the instruction set is picked when it is imported (:func:`kernel_isa`).

:class:`GemvLinear` keeps the plain weight (no copy, no other layout: ``unpack()`` returns it)
and uses the kernel when the call is one it serves: the input holds a single row, the rank
computes with one thread (``torch.get_num_threads() == 1``, as xtp runs tp ranks that share the
cores, :mod:`.threads`; with more threads MKL's parallel GEMV is used) and no gradient is
recorded. Everything else (prefill, batches) is ``F.linear`` on the same weight. Results differ
from ``F.linear``'s only by rounding (a different summation order).

:class:`Bf16GemvLinear` (chosen for a rank computing with one thread, when weights are packed)
stores the bf16 weight once in the kernel's blocked layout
(:func:`pack_bf16`: blocks of 8 rows read as one stream, where plain bf16 rows are short
streams the CPU's prefetchers restart at every page), widens it to fp32 exactly and sums with
FMA; at one token it reads faster than oneDNN's packed bf16 matmul (torch's fastest path).
Inputs of up to :data:`MAX_KERNEL_ROWS` rows go to the kernel (each block reused from L1 for
every row); prefill unpacks each weight for ``F.linear`` (a copy of the weight per call: a
fixed cost per forward that long prompts amortize). The layout is for one-sequence decode:
with several rows (batched decode) oneDNN's layout is faster per matmul
(:data:`MAX_KERNEL_ROWS`), and ``XTP_CPU_PACK=all`` selects it. Measured speeds:
bench/RESULTS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packed.base import PackedLinear

try:
    from . import _gemv as _kernel
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


ROW_BLOCK, COLUMN_CHUNK = 8, 32  # the bf16 layout's blocks: 8 rows x chunks of 32 columns
#: inputs with more rows than this (prefill) go to F.linear on the unpacked weight: up to here
#: the kernel is faster than unpack + F.linear (per row count: bench/RESULTS.md, "bf16 through
#: the kernel too"). With several rows the kernel (one FMA pass per row) turns compute bound
#: and oneDNN's layout is faster: for batched bf16 decode use XTP_CPU_PACK=all (oneDNN's layout
#: for every dtype)
MAX_KERNEL_ROWS = 16


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``(out, in)`` in the kernel's bf16 layout: zero-padded to ``(out8, in32)``
    (multiples of 8 and 32), then ``(out8 / 8, in32 / 32, 8, 32)``: blocks of 8 rows, each a
    run of 32-column chunks of its 8 rows. Returned flat, ``out8 * in32`` values."""
    out_f, in_f = weight.shape
    out8, in32 = -(-out_f // ROW_BLOCK) * ROW_BLOCK, -(-in_f // COLUMN_CHUNK) * COLUMN_CHUNK
    if (out8, in32) != (out_f, in_f):
        padded = weight.new_zeros(out8, in32)
        padded[:out_f, :in_f] = weight
        weight = padded
    blocks = weight.view(out8 // ROW_BLOCK, ROW_BLOCK, in32 // COLUMN_CHUNK, COLUMN_CHUNK)
    return blocks.permute(0, 2, 1, 3).contiguous().view(-1)


def unpack_bf16(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`pack_bf16`: the ``shape`` weight, bit for bit (in torch; the
    kernel module's ``unpack_bf16`` does the same several times faster)."""
    out_f, in_f = shape
    out8, in32 = -(-out_f // ROW_BLOCK) * ROW_BLOCK, -(-in_f // COLUMN_CHUNK) * COLUMN_CHUNK
    blocks = packed.view(out8 // ROW_BLOCK, in32 // COLUMN_CHUNK, ROW_BLOCK, COLUMN_CHUNK)
    return blocks.permute(0, 2, 1, 3).reshape(out8, in32)[:out_f, :in_f].contiguous()


class Bf16GemvLinear(PackedLinear):
    """A bf16 CPU weight ``(out_features, in_features)`` in the kernel's blocked layout
    (:func:`pack_bf16`: one copy, made once), whose products with up to
    :data:`MAX_KERNEL_ROWS` input rows go to xtp's GEMV kernel, whatever the thread count (the
    layout is the kernel's own). Larger inputs (prefill) and calls that record a gradient use
    ``F.linear`` on the unpacked weight, one weight at a time. Sums are fp32; each output is
    rounded to bf16 once, as ``F.linear`` does, so results differ from it only by rounding
    (summation order). Raises like :class:`GemvLinear`."""

    def __init__(self, weight: torch.Tensor) -> None:
        if _WHY:
            raise RuntimeError(f"xtp's GEMV kernel is not available: {_WHY}")
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError("Bf16GemvLinear takes a 2-D bfloat16 CPU weight, got "
                             f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
        self.shape, self.dtype, self.device = weight.shape, weight.dtype, weight.device
        self._packed = pack_bf16(weight.detach())

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        out_features, in_features = self.shape
        rows = x.numel() // max(in_features, 1)
        if (x.shape[-1] != in_features or rows > MAX_KERNEL_ROWS
                or (torch.is_grad_enabled() and (x.requires_grad or (
                    bias is not None and bias.requires_grad)))
                or (bias is not None and (bias.dtype != torch.bfloat16
                                          or bias.device.type != "cpu"))):
            return F.linear(x, self.unpack(), bias)
        x = x.contiguous()
        y = torch.empty((*x.shape[:-1], out_features), dtype=torch.bfloat16)
        b = None if bias is None else bias.detach().contiguous()
        _kernel.gemv_bf16(self._packed.data_ptr(), x.data_ptr(),
                          None if b is None else b.data_ptr(), y.data_ptr(), out_features,
                          in_features, rows)
        return y

    def unpack(self) -> torch.Tensor:
        weight = torch.empty(self.shape, dtype=torch.bfloat16)
        _kernel.unpack_bf16(self._packed.data_ptr(), weight.data_ptr(), *self.shape)
        return weight

    @property
    def nbytes(self) -> int:
        return self._packed.numel() * self._packed.element_size()
