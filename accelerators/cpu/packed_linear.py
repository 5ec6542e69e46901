"""CPU linear weights in their fastest layout for inference matmuls: the GEMV kernel's for fp32
(plain) and bf16 (blocked), oneDNN's blocked layout for fp16.

torch's CPU ``F.linear`` in bf16 hands the plain ``(out, in)`` weight to oneDNN, which re-blocks
it on every call; at decode (one token: a matrix-vector product) that makes the call
compute-bound. fp32 goes to MKL's GEMV, which streams the plain weight slower than one core can
read it. Prepacking once, with torch's own oneDNN ops (``torch.ops.mkldnn``, part of every x86
CPU build of torch: nothing to compile), removes the re-blocking. Measured speeds and decode
times: bench/RESULTS.md. Results equal ``F.linear``'s within rounding (bf16 bit for bit in our
measurements); ``unpack()`` returns the original weight bit for bit.

Which layout each dtype gets (:func:`env_layouts`): fp32 keeps its plain layout and bf16 is stored
in the kernel's blocked layout, and their one-token products go to xtp's own GEMV kernel
(:mod:`xtp.accelerators.cpu.gemv`: faster than MKL's fp32 GEMV and oneDNN's packed bf16 matmul at
one token), where it is built and the CPU has AVX-512 or AVX2 (else fp32 stays dense: MKL, and bf16
is packed for oneDNN): fp32 for ranks computing on one thread (``XTP_CPU_GEMV_THREADS=N``: up to N
threads, the kernel splitting a product across them; ``gemv.MAX_KERNEL_THREADS``), bf16 also on
any number of threads where the kernel splits products across torch's own OpenMP threads
(``gemv.team_serves_bf16``), and bf16 on one thread except on CPUs with AMX
(:data:`AMX_LAYOUTS`); fp16 is packed for oneDNN (fp32 is not: oneDNN's packed fp32 did not beat the
dense decode time, not worth its packing copy). ``XTP_CPU_PACK`` chooses: ``1`` (default) as above,
``all`` every dtype in oneDNN's layout, ``kernel`` the kernel's layouts on AMX CPUs too, ``0``
nothing. A weight oneDNN cannot pack (fp16 without the
CPU instructions for it, a torch build without oneDNN) is left dense, and so is a weight under
:data:`MIN_BYTES`: a packed call costs more per call than ``F.linear``'s, which only a large enough
matrix wins back (the measured break-even sizes: bench/RESULTS.md).
"""

from __future__ import annotations

import functools

import torch

from ..env import cpu_pack
from ..packed.base import PackedLinear

#: every dtype oneDNN can pack (``XTP_CPU_PACK=all``)
PACKABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ONEDNN, GEMV = "oneDNN", "gemv"  # the layouts: oneDNN's blocked one, plain for xtp's kernel
GEMV_ROWS = "gemv-rows"  # bf16 for the kernel as plain rows (``XTP_CPU_PACK=kernel-rows``)
#: the default: xtp's GEMV kernel for fp32 and bf16, oneDNN for fp16 (module docstring) ...
DEFAULT_LAYOUTS = {torch.bfloat16: GEMV, torch.float16: ONEDNN, torch.float32: GEMV}
#: ... except on CPUs with AMX bf16 tiles for ranks that compute on one thread (or where the
#: kernel cannot use torch's OpenMP team): there oneDNN's bf16 matmul, which uses the tiles,
#: outran the kernel on one core of an Intel Xeon with AMX; on several threads through torch's
#: team the kernel was faster, per product and in the model (bench/RESULTS.md); fp32 keeps the
#: kernel there
AMX_LAYOUTS = {torch.bfloat16: ONEDNN}
MIN_BYTES = 1 << 20


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bf16 tiles (the ``amx_bf16`` flag of Linux's /proc/cpuinfo;
    False where that cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def env_layouts() -> dict[torch.dtype, str]:
    """The layout ``XTP_CPU_PACK`` asks for, by dtype: ``1``/unset -> :data:`DEFAULT_LAYOUTS`
    (with :data:`AMX_LAYOUTS` on a CPU with AMX bf16, unless the rank computes on several
    threads and the kernel runs on torch's OpenMP team),
    ``all`` -> oneDNN for every dtype in :data:`PACKABLE_DTYPES`, ``kernel`` ->
    :data:`DEFAULT_LAYOUTS` on every CPU, ``kernel-rows`` -> the same with bf16 as
    :data:`GEMV_ROWS`, ``0`` -> none. Another value
    raises :class:`~xtp.accelerators.errors.EnvSettingError` (an ``AcceleratorError``)."""
    wanted = cpu_pack()
    if wanted == "off":
        return {}
    if wanted == "all":
        return dict.fromkeys(PACKABLE_DTYPES, ONEDNN)
    if wanted == "kernel":
        return dict(DEFAULT_LAYOUTS)
    if wanted == "kernel-rows":
        return {**DEFAULT_LAYOUTS, torch.bfloat16: GEMV_ROWS}
    amx = cpu_has_amx_bf16() and not _bf16_kernel_on_team()
    return {**DEFAULT_LAYOUTS, **(AMX_LAYOUTS if amx else {})}


def _bf16_kernel_on_team() -> bool:
    """Whether this rank computes on several threads and its bf16 products would run through
    xtp's kernel on torch's OpenMP team (:func:`.gemv.team_serves_bf16`)."""
    if torch.get_num_threads() < 2:
        return False
    from .gemv import team_serves_bf16, unavailable_reason

    return not unavailable_reason() and team_serves_bf16()


def layouts_to_use(dtypes: tuple[torch.dtype, ...] | None = None) -> dict[torch.dtype, str]:
    """:func:`env_layouts`, or, where ``dtypes`` is given, oneDNN's layout for those of them
    oneDNN can pack; nothing at all when ``XTP_CPU_PACK=0``."""
    wanted = env_layouts()
    if wanted and dtypes is not None:
        wanted = {d: ONEDNN for d in dtypes if d in PACKABLE_DTYPES}
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
        self.check_input(x)
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
    """``weight`` in the layout its dtype gets (:func:`layouts_to_use`: oneDNN's, or the plain
    one served by xtp's GEMV kernel for fp32), or ``None`` where that is off
    (``XTP_CPU_PACK=0``), its dtype gets no layout, the layout is unavailable here or fails,
    the weight is not a 2-D CPU tensor or is smaller than ``min_bytes``."""
    layout = layouts_to_use(dtypes).get(weight.dtype)
    if (layout is None or weight.device.type != "cpu" or weight.dim() != 2
            or weight.numel() * weight.element_size() < min_bytes):
        return None
    if layout in (GEMV, GEMV_ROWS):  # fp32 or bf16
        from .gemv import (
            Bf16GemvLinear,
            Bf16RowsLinear,
            GemvLinear,
            kernel_threads,
            rows_fit,
            unavailable_reason,
        )

        usable = not unavailable_reason()
        if weight.dtype == torch.float32:  # without the kernel: dense (MKL)
            return GemvLinear(weight) if usable and weight.is_contiguous() else None
        # bf16: a rank computing with more threads than the kernel serves keeps oneDNN's
        # parallel matmul (the layout is chosen once, here, with the threads set for the run)
        if usable and kernel_threads(torch.bfloat16):
            plain = layout == GEMV_ROWS and weight.is_contiguous() and rows_fit(weight.shape)
            return Bf16RowsLinear(weight) if plain else Bf16GemvLinear(weight)
    if not onednn_available():  # bf16 without the kernel: oneDNN's layout
        return None
    try:
        return OneDNNPackedLinear(weight)
    except RuntimeError:  # e.g. fp16 on a CPU without avx512_fp16 / avx_ne_convert
        return None
