"""Plain CPU cores, collectives through gloo (``ccl`` only when asked for by XTP_DIST_BACKEND).

All-reduce and all-gather between ranks of one host go through shared memory
(:mod:`xtp.accelerators.cpu.shm`), faster than gloo for decode-sized tensors (measured:
bench/RESULTS.md); the group falls back to gloo where that cannot serve it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from typing_extensions import override

from .._torch_compat import backend_available
from ..errors import BackendUnavailableError
from .base import Accelerator, Availability

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist

    from ..comm.base import Communicator
    from ..packed.base import PackedLinear


class CpuAccelerator(Accelerator):
    name = "cpu"
    device_type = "cpu"

    def __init__(self, shm: bool | None = None, pack_min_bytes: int | None = None,
                 pack_dtypes: tuple[torch.dtype, ...] | None = None) -> None:
        """``shm``: use shared-memory collectives between ranks of one host; ``None`` (default)
        lets ``XTP_CPU_SHM`` / ``XTP_DIST_BACKEND`` decide, ``False`` always uses gloo.
        ``pack_min_bytes``: the smallest weight :meth:`pack_linear_weight` packs (default
        :data:`xtp.accelerators.cpu.packed_linear.MIN_BYTES`); ``pack_dtypes``: the dtypes it
        packs, all in oneDNN's layout (default: what ``XTP_CPU_PACK`` asks for, i.e. oneDNN
        for bf16/fp16 and xtp's GEMV kernel for fp32 unless it says ``all``;
        ``XTP_CPU_PACK=0`` packs nothing whatever this says)."""
        self.shm = shm
        self.pack_min_bytes = pack_min_bytes
        self.pack_dtypes = pack_dtypes

    @override
    def availability(self) -> Availability:
        return Availability(True)

    @override
    def device_count(self) -> int:
        return 1

    @override
    def device(self, index: int | None = None) -> torch.device:
        return torch.device("cpu")

    @override
    def set_device(self, index: int) -> None:
        """CPU ranks share one device; nothing to bind."""

    @override
    def init_device_id(self, local_index: int) -> torch.device | None:
        return None  # torch rejects a CPU device_id for gloo (pytorch issue #160731)

    @override
    def default_dist_backend(self) -> str:
        if not backend_available("gloo"):
            raise BackendUnavailableError(
                "this torch build has no gloo backend; install a standard torch build"
            )
        return "gloo"

    @override
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    @override
    def pack_linear_weight(self, weight: torch.Tensor) -> PackedLinear | None:
        """oneDNN's blocked layout for bf16/fp16 weights, xtp's GEMV kernel for fp32
        (:mod:`xtp.accelerators.cpu.packed_linear`); ``XTP_CPU_PACK`` chooses (``0``: none,
        ``all``: oneDNN for fp32 too)."""
        from ..cpu.packed_linear import MIN_BYTES, pack_cpu_linear

        return pack_cpu_linear(weight, MIN_BYTES if self.pack_min_bytes is None
                               else self.pack_min_bytes, self.pack_dtypes)

    @override
    def linear_packing(self) -> str:
        from ..cpu.gemv import kernel_isa, team_serves_bf16, unavailable_reason
        from ..cpu.packed_linear import GEMV, GEMV_ROWS, MIN_BYTES, layouts_to_use, onednn_available
        from ..env import ENV_CPU_PACK, setting
        from ..errors import AcceleratorError

        try:
            layouts = layouts_to_use(self.pack_dtypes)
        except AcceleratorError as exc:
            return f"not set up: {exc}"
        if not layouts:
            return f"off ({setting(ENV_CPU_PACK)})"
        size = MIN_BYTES if self.pack_min_bytes is None else self.pack_min_bytes
        names = lambda dtypes: "/".join(str(d).removeprefix("torch.") for d in dtypes)
        kernel = [d for d, how in layouts.items() if how in (GEMV, GEMV_ROWS)]
        onednn = [d for d, how in layouts.items() if how not in (GEMV, GEMV_ROWS)]
        if kernel and not kernel_isa():  # bf16 falls back to oneDNN, fp32 to dense
            onednn += [d for d in kernel if d != torch.float32]
        parts = []
        if kernel:
            team = torch.bfloat16 in kernel and kernel_isa() and team_serves_bf16()
            parts.append(f"xtp's GEMV kernel ({kernel_isa()}) for {names(kernel)} at decode "
                         "(ranks on one thread" + (", bfloat16 on any number: on torch's OpenMP "
                                                   "threads" if team else "")
                         + "; XTP_CPU_GEMV_THREADS=N: up to N)"
                         if kernel_isa() else f"no GEMV kernel ({unavailable_reason()}): "
                                              "float32 dense")
        if onednn:
            parts.append(f"oneDNN blocked layout for {names(onednn)}" if onednn_available()
                         else f"no oneDNN in this torch build (torch.ops.mkldnn): "
                              f"{names(onednn)} dense")
        return (f"{'; '.join(parts)}; weights >= {size / 2**20:g} MiB ({ENV_CPU_PACK}=all: "
                f"oneDNN for every dtype, {ENV_CPU_PACK}=0: off)")

    @override
    def communicator(self, group: dist.ProcessGroup | None) -> Communicator:
        """A shared-memory communicator when every rank of ``group`` (more than one) is on
        this host and it is not switched off, else the gloo :class:`TorchCommunicator`.
        Collective over ``group`` when it has more than one rank."""
        from ..cpu.shm import create_cpu_communicator

        return create_cpu_communicator(group, enabled=self.shm)
