"""NVIDIA GPUs through CUDA, collectives through NCCL."""

from __future__ import annotations

import torch
from typing_extensions import override

from .._torch_compat import backend_available
from ..errors import BackendUnavailableError
from .base import Accelerator, Availability


class CudaAccelerator(Accelerator):
    name = "cuda"
    device_type = "cuda"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    compiled_decode = True  # CUDA graphs: 12 -> 2.5 ms/token on an H200 (bench/RESULTS.md)

    @override
    def availability(self) -> Availability:
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            return Availability(
                False,
                f"this torch ({torch.__version__}) was built without CUDA",
                "install a CUDA build of torch (pip install torch on Linux x86_64 gives one)",
            )
        if not torch.cuda.is_available():
            return Availability(
                False,
                "torch has CUDA but sees no GPU (no device, driver missing, or "
                "CUDA_VISIBLE_DEVICES hides them all)",
                "check `nvidia-smi` and CUDA_VISIBLE_DEVICES",
            )
        return Availability(True)

    @override
    def device_count(self) -> int:
        return torch.cuda.device_count() if self.is_available() else 0

    @override
    def current_device(self) -> int:
        return torch.cuda.current_device()

    @override
    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)

    @override
    def synchronize(self, index: int | None = None) -> None:
        torch.cuda.synchronize(index)

    @override
    def default_dist_backend(self) -> str:
        if not backend_available("nccl"):
            raise BackendUnavailableError(
                "this torch build has no NCCL backend; install a CUDA build of torch with NCCL, "
                "or set XTP_DIST_BACKEND=gloo to run collectives through gloo"
            )
        return "nccl"

    @override
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        dtypes = [torch.float32, torch.float16]
        if self.is_available() and torch.cuda.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        return tuple(dtypes)

    @override
    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    @override
    def memory_allocated(self, index: int | None = None) -> int | None:
        return torch.cuda.memory_allocated(index)

    @override
    def max_memory_allocated(self, index: int | None = None) -> int | None:
        return torch.cuda.max_memory_allocated(index)

    @override
    def reset_peak_memory_stats(self, index: int | None = None) -> None:
        torch.cuda.reset_peak_memory_stats(index)
