"""Plain CPU cores, collectives through gloo (``ccl`` only when asked for by XTP_DIST_BACKEND)."""

from __future__ import annotations

import torch

from ._torch_compat import backend_available
from .base import Accelerator, Availability
from .errors import BackendUnavailableError


class CpuAccelerator(Accelerator):
    name = "cpu"
    device_type = "cpu"

    def availability(self) -> Availability:
        return Availability(True)

    def device_count(self) -> int:
        return 1

    def device(self, index: int | None = None) -> torch.device:
        return torch.device("cpu")

    def set_device(self, index: int) -> None:
        """CPU ranks share one device; nothing to bind."""

    def init_device_id(self, local_index: int) -> torch.device | None:
        return None  # torch rejects a CPU device_id for gloo (pytorch issue #160731)

    def default_dist_backend(self) -> str:
        if not backend_available("gloo"):
            raise BackendUnavailableError(
                "this torch build has no gloo backend; install a standard torch build"
            )
        return "gloo"

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)
