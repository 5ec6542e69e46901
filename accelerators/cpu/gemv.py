"""xtp's GEMV kernel for CPU decode: fp32 (:class:`GemvLinear`) and bf16
(:class:`Bf16GemvLinear`; :class:`Bf16RowsLinear` keeps bf16 as plain rows, an experiment), on
the rank's threads.

At decode a linear layer multiplies one row (or a few: batched decode) by its weight, a
matrix-vector product whose time is the time to read the weight. xtp's kernel
(``accelerators/cpu/csrc/``: eight weight rows at a time, one AVX-512 or AVX2 accumulator each,
two input rows per pass on AVX-512) reads it faster than torch's CPU ``F.linear`` does (MKL's
GEMV in fp32; measured speeds in bench/RESULTS.md). One product is split by output rows across
the rank's threads (``torch.get_num_threads()``) by the extension's own thread pool
(``gemv_pool.c``: persistent pthreads started on first need, spinning briefly between products
then sleeping, fork-safe; not OpenMP, which torch bundles its own copy of), or by torch's own
OpenMP threads (team mode, :mod:`.openmp_team`), with the GIL released. Every output is
summed in the same order whatever the thread count and the number of rows, so results do not
depend on either. The kernel is a C extension built at install time
(``setup.py``, optional: no compiler, no kernel) and needs no torch headers; the instruction set
is picked when it is imported (:func:`kernel_isa`).

Which calls the kernel serves: inputs of up to :data:`MAX_KERNEL_ROWS` rows, ranks computing
with up to :data:`MAX_KERNEL_THREADS` threads (default 1: one-thread ranks, e.g. tp ranks sharing
a small host's cores; ``XTP_CPU_GEMV_THREADS=N`` lets the kernel split products across up to N
threads; torch's parallel paths above) and, in bf16, ranks of any thread count whose products
run on torch's own OpenMP team (:func:`team_serves_bf16`), calls that record no gradient.
Everything else (prefill, training) is ``F.linear`` on the same weight. Results differ from
``F.linear``'s only by rounding (a different summation order).

:class:`GemvLinear` keeps the plain fp32 weight (no copy, no other layout: ``unpack()`` returns
it). :class:`Bf16GemvLinear` stores the bf16 weight once in the kernel's blocked layout
(:func:`pack_bf16`: blocks of 8 rows read as one stream, where plain bf16 rows are short
streams the CPU's prefetchers restart at every page), widens it to fp32 exactly and sums with
FMA; prefill unpacks each weight for ``F.linear`` (a copy of the weight per call: a fixed cost
per forward that long prompts amortize). With several rows the kernel makes one FMA pass per
row over each block (two rows per pass on AVX-512) and turns compute bound as rows grow, where
oneDNN's layout (``XTP_CPU_PACK=all``) may be faster per matmul: ``bench/cpu_gemv_threads.py``
measures both by rows and threads. Measured speeds: bench/RESULTS.md.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from ..env import gemv_rows, gemv_split, gemv_team, gemv_threads
from ..packed.base import PackedLinear
from .openmp_team import gomp_parallel_address

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


#: inputs with more rows than this (prefill) go to ``F.linear``: up to here the kernel is faster
#: than unpack + ``F.linear`` in bf16 (per row count: bench/RESULTS.md, "bf16 through the kernel
#: too"); fp32 takes the same limit (bench/cpu_gemv_threads.py measures 1, 4 and 16 rows)
MAX_KERNEL_ROWS = 16
#: ranks computing with more threads than this (``torch.get_num_threads()``) use torch's
#: parallel paths instead of the kernel for fp32 (``XTP_CPU_GEMV_THREADS`` overrides it for
#: every dtype). 1: the kernel serves fp32 ranks computing on one thread: on several threads
#: MKL's GEMV was as fast or faster per product on the 16-core Xeon (bench/RESULTS.md). bf16
#: products go to the kernel at any thread count where they run on torch's own OpenMP team
#: (:func:`team_mode`; llama-1b bf16 tp 2 x 8 threads on that Xeon: 33.6-35.6 ms/token against
#: 42.2 through oneDNN in the same run, bench/RESULTS.md, 2026-12-03 night). The kernel's own
#: pool never serves several threads by default: its workers and torch's OpenMP threads, which
#: spin after every op, fight for the same cores (fp32 tp 2 x 8: 210 ms/token against 38.5)
MAX_KERNEL_THREADS = 1


def kernel_threads(dtype: torch.dtype = torch.float32) -> int:
    """The threads the kernel splits a ``dtype`` product across: the rank's
    ``torch.get_num_threads()``, or 0 where the kernel does not serve it (more threads than
    ``XTP_CPU_GEMV_THREADS`` allows, else than :data:`MAX_KERNEL_THREADS`, except bf16 on torch's
    OpenMP team: :func:`team_serves_bf16`), or ``XTP_CPU_GEMV_SPLIT`` threads of its own pool
    when that is set (torch's ops on one thread, products on the rank's cores)."""
    threads = torch.get_num_threads()
    limit = gemv_threads()
    if threads > (limit or MAX_KERNEL_THREADS) and not (
            limit is None and dtype == torch.bfloat16 and team_serves_bf16()):
        return 0
    split = gemv_split()
    if split is not None:  # the kernel's own pool, as many threads as asked
        team_mode()
        return len(os.sched_getaffinity(0)) if split == "cores" else split
    if threads > 1:
        team_mode()
    return threads


def team_serves_bf16() -> bool:
    """Whether bf16 products go to the kernel on a rank of several threads by default: team
    mode is on (torch's own OpenMP runtime found, ``XTP_CPU_GEMV_TEAM`` not off) and
    ``XTP_CPU_GEMV_SPLIT`` is not set. Decides team mode if it was not decided yet."""
    return _kernel is not None and gemv_split() is None and team_mode()


def unpack_threads() -> int:
    """Threads that unpack a bf16 weight for ``F.linear`` (prefill): the rank's on torch's
    OpenMP team, else one (the kernel's own pool is not started for it)."""
    threads = torch.get_num_threads()
    return threads if threads > 1 and team_serves_bf16() else 1


_team: list = []  # [whether team mode is on], once decided in this process


@functools.cache
def _gomp_parallel() -> int | None:
    """:func:`.openmp_team.gomp_parallel_address`, looked up once per process."""
    return gomp_parallel_address()


def team_mode() -> bool:
    """Whether products split across threads run on torch's own OpenMP threads (decided once
    per process, on first need: ``XTP_CPU_GEMV_TEAM`` and whether torch's OpenMP runtime is
    found, :mod:`.openmp_team`), else on the kernel's own pool."""
    if not _team:
        set_team_mode(gemv_team() and gemv_split() is None)
    return _team[0]


def set_team_mode(on: bool) -> bool:
    """Split products across torch's OpenMP threads (``on``, where its runtime is found) or
    across the kernel's own pool from now on; returns whether team mode is on."""
    address = _gomp_parallel() if on else None
    _team[:] = [bool(_kernel.use_team(address))]
    return _team[0]


def _serves(x: torch.Tensor, in_features: int, bias: torch.Tensor | None,
            dtype: torch.dtype) -> int:
    """How many threads the kernel computes ``x @ W.T + bias`` on, or 0 when it does not serve
    this call (too many rows or threads, a gradient recorded, a bias it cannot read)."""
    rows = x.numel() // max(in_features, 1)
    if (x.shape[-1] != in_features or rows > (gemv_rows() or MAX_KERNEL_ROWS) or rows < 1
            or (torch.is_grad_enabled() and (x.requires_grad or (
                bias is not None and bias.requires_grad)))
            or (bias is not None and (bias.dtype != dtype or bias.device.type != "cpu"))):
        return 0
    return kernel_threads(dtype)


def _product(lin: PackedLinear, entry: str, weight: torch.Tensor, x: torch.Tensor,
             bias: torch.Tensor | None, fallback) -> torch.Tensor:
    """``x @ W.T (+ bias)`` of ``lin`` (``x`` ``(..., in)`` -> ``(..., out)`` in its dtype):
    the kernel's ``entry`` on ``weight``'s storage where it serves the call (:func:`_serves`),
    else ``fallback()``."""
    out_features, in_features = lin.shape
    threads = _serves(x, in_features, bias, lin.dtype)
    if not threads:
        return fallback()
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], out_features), dtype=lin.dtype)
    b = None if bias is None else bias.detach().contiguous()
    args = (weight.data_ptr(), x.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
            out_features, in_features, x.numel() // in_features, threads)
    if _profiling():  # the kernel is no torch op: name its time for the profiler
        with torch.profiler.record_function(f"xtp::{entry}"):
            getattr(_kernel, entry)(*args)
    else:
        getattr(_kernel, entry)(*args)
    return y


_profiling = torch._C._autograd._profiler_enabled  # whether torch.profiler is recording (~50 ns)


class GemvLinear(PackedLinear):
    """An fp32 CPU weight ``(out_features, in_features)``, row-major, whose products with up to
    :data:`MAX_KERNEL_ROWS` input rows go to xtp's GEMV kernel (:func:`_serves`). Raises
    ``ValueError`` for any other weight, ``RuntimeError`` where the kernel is not available
    (:func:`unavailable_reason`)."""

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

    _entry = "gemv"  # the kernel's entry point for this weight's dtype and layout

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        self.check_input(x)
        return _product(self, self._entry, self._weight, x, bias,
                        lambda: F.linear(x, self._weight, bias))

    def unpack(self) -> torch.Tensor:
        return self._weight

    @property
    def nbytes(self) -> int:
        return self._weight.numel() * self._weight.element_size()


ROW_BLOCK, COLUMN_CHUNK = 8, 32  # the bf16 layout's blocks: 8 rows x chunks of 32 columns


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
    :data:`MAX_KERNEL_ROWS` input rows go to xtp's GEMV kernel on the rank's threads (up to
    :data:`MAX_KERNEL_THREADS`). Larger inputs (prefill) and calls that record a gradient use
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
        return _product(self, "gemv_bf16", self._packed, x, bias,
                        lambda: F.linear(x, self.unpack(), bias))

    def unpack(self) -> torch.Tensor:
        weight = torch.empty(self.shape, dtype=torch.bfloat16)
        _kernel.unpack_bf16(self._packed.data_ptr(), weight.data_ptr(), *self.shape,
                            unpack_threads())
        return weight

    @property
    def nbytes(self) -> int:
        return self._packed.numel() * self._packed.element_size()


class Bf16RowsLinear(GemvLinear):
    """A bf16 CPU weight ``(out_features, in_features)`` kept as it is (plain rows, no copy),
    whose products with up to :data:`MAX_KERNEL_ROWS` input rows (``XTP_CPU_GEMV_ROWS``) go
    to xtp's GEMV kernel on the same terms as :class:`Bf16GemvLinear`; everything else is
    ``F.linear`` on the weight itself (no unpacked copy). An experiment
    (``XTP_CPU_PACK=kernel-rows``, ``xtp bench --vs xtp-kernel-rows``): on one core plain bf16
    rows read ~30% slower than the blocked layout on an AMD EPYC and 3-10% faster on an Intel
    Xeon (bench/RESULTS.md), and need no copy for prefill and batches. Sums equal
    :class:`Bf16GemvLinear`'s bit for bit. Takes ``in_features`` a multiple of 32 and
    ``out_features`` of 8 (``ValueError`` otherwise: :func:`rows_fit`)."""

    _entry = "gemv_bf16_rows"

    def __init__(self, weight: torch.Tensor) -> None:  # not super's: that one takes fp32
        if _WHY:
            raise RuntimeError(f"xtp's GEMV kernel is not available: {_WHY}")
        if (weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2
                or not weight.is_contiguous() or not rows_fit(weight.shape)):
            raise ValueError("Bf16RowsLinear takes a contiguous 2-D bfloat16 CPU weight with "
                             f"in_features a multiple of {COLUMN_CHUNK} and out_features of "
                             f"{ROW_BLOCK}, got {weight.dtype} {tuple(weight.shape)} on "
                             f"{weight.device}")
        self.shape, self.dtype, self.device = weight.shape, weight.dtype, weight.device
        self._weight = weight.detach()


def rows_fit(shape) -> bool:
    """Whether a weight of ``shape`` ``(out, in)`` suits :class:`Bf16RowsLinear`."""
    return shape[1] % COLUMN_CHUNK == 0 and shape[0] % ROW_BLOCK == 0
