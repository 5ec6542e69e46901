"""Intel GPUs through torch.xpu; collectives through ``xccl`` (stock torch) or ``ccl`` (oneCCL).

The oneCCL bindings (``oneccl_bindings_for_pytorch``) are end-of-life and abort on a torch
version mismatch, so they are imported only in :meth:`prepare_distributed` when ``ccl`` was
chosen, never while detecting.
"""

from __future__ import annotations

import torch
from typing_extensions import override

from .._torch_compat import backend_available, device_module, module_installed
from ..errors import BackendUnavailableError
from .base import Accelerator, Availability

ONECCL_MODULE = "oneccl_bindings_for_pytorch"


class XpuAccelerator(Accelerator):
    name = "xpu"
    device_type = "xpu"
    visible_devices_env = "ZE_AFFINITY_MASK"

    def _module(self):
        return device_module("xpu")

    @override
    def availability(self) -> Availability:
        xpu = self._module()
        if xpu is None or not hasattr(xpu, "is_available"):
            return Availability(
                False,
                f"this torch ({torch.__version__}) has no torch.xpu module",
                "install torch >= 2.5 built for XPU (wheels from PyTorch's XPU index)",
            )
        if not xpu.is_available():
            return Availability(
                False,
                "torch.xpu sees no Intel GPU (no device, no driver/Level Zero runtime, or a torch "
                "build without XPU support)",
                "install an XPU build of torch and Intel's GPU driver; check `sycl-ls` and "
                "ZE_AFFINITY_MASK",
            )
        return Availability(True)

    @override
    def device_count(self) -> int:
        return self._module().device_count() if self.is_available() else 0

    @override
    def current_device(self) -> int:
        return self._module().current_device()

    @override
    def set_device(self, index: int) -> None:
        self._module().set_device(index)

    @override
    def synchronize(self, index: int | None = None) -> None:
        self._module().synchronize(index)

    @override
    def default_dist_backend(self) -> str:
        if backend_available("xccl"):
            return "xccl"
        if module_installed(ONECCL_MODULE):
            return "ccl"
        raise BackendUnavailableError(
            "no collective backend for XPU: this torch has no 'xccl' and "
            f"'{ONECCL_MODULE}' is not installed; install torch >= 2.8 for XPU (xccl built in), "
            "or the oneCCL bindings matching your torch (end-of-life), or set "
            "XTP_DIST_BACKEND=gloo"
        )

    @override
    def prepare_distributed(self, backend: str) -> None:
        if backend == "ccl":
            import importlib

            importlib.import_module(ONECCL_MODULE)  # registers the 'ccl' backend

    @override
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    @override
    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)
        self._module().manual_seed_all(seed)

    @override
    def memory_allocated(self, index: int | None = None) -> int | None:
        return self._module().memory_allocated(index)

    @override
    def max_memory_allocated(self, index: int | None = None) -> int | None:
        return self._module().max_memory_allocated(index)

    @override
    def reset_peak_memory_stats(self, index: int | None = None) -> None:
        self._module().reset_peak_memory_stats(index)
