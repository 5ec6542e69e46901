"""Intel Gaudi (HPU) through ``habana_frameworks``; collectives through ``hccl``.

Detection imports nothing: it needs the ``habana_frameworks`` package to be installed *and*
Gaudi device nodes to exist (``/dev/accel/accel*`` or the older ``/dev/hl<N>``). When the user
has already imported ``habana_frameworks.torch``, ``torch.hpu`` answers instead. The vendor
import happens when a device is bound or the ``hccl`` backend is prepared.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys

import torch
from typing_extensions import override

from .._torch_compat import module_installed
from .base import Accelerator, Availability

VENDOR_MODULE = "habana_frameworks.torch"
HCCL_MODULE = "habana_frameworks.torch.distributed.hccl"
CORE_MODULE = "habana_frameworks.torch.core"


class HpuAccelerator(Accelerator):
    name = "hpu"
    device_type = "hpu"
    visible_devices_env = "HABANA_VISIBLE_MODULES"
    #: glob patterns of Gaudi device nodes (class attribute so tests can point it elsewhere)
    device_node_globs: tuple[str, ...] = ("/dev/accel/accel[0-9]*", "/dev/hl[0-9]*")

    def _vendor_loaded(self) -> bool:
        return VENDOR_MODULE in sys.modules and hasattr(torch, "hpu")

    def _device_nodes(self) -> list[str]:
        nodes: list[str] = []
        for pattern in self.device_node_globs:
            nodes.extend(p for p in glob.glob(pattern) if not p.endswith("_controlD"))
        return sorted(set(nodes))

    @override
    def availability(self) -> Availability:
        if self._vendor_loaded():
            if torch.hpu.is_available():
                return Availability(True)
            return Availability(
                False,
                "habana_frameworks is loaded but torch.hpu sees no Gaudi device",
                "check `hl-smi` and HABANA_VISIBLE_MODULES",
            )
        if not module_installed("habana_frameworks"):
            return Availability(
                False,
                "the Gaudi software stack (habana_frameworks) is not installed",
                "install Intel Gaudi's PyTorch stack (habanalabs-installer.sh or a Gaudi Docker "
                "image; it is not on PyPI)",
            )
        if not self._device_nodes():
            return Availability(
                False,
                "habana_frameworks is installed but no Gaudi device node exists "
                f"({', '.join(self.device_node_globs)})",
                "check that the habanalabs driver is loaded (`hl-smi`)",
            )
        return Availability(True)

    @override
    def device_count(self) -> int:
        if not self.is_available():
            return 0
        if self._vendor_loaded():
            return torch.hpu.device_count()
        visible = self.visible_devices()
        if visible:
            return len([v for v in visible.split(",") if v.strip()])
        return len(self._device_nodes())

    def _load(self):
        importlib.import_module(VENDOR_MODULE)
        return torch.hpu

    @override
    def set_device(self, index: int) -> None:
        hpu = self._load()
        if hasattr(hpu, "set_device"):
            hpu.set_device(index)

    @override
    def synchronize(self, index: int | None = None) -> None:
        if self._vendor_loaded():
            torch.hpu.synchronize()

    @override
    def default_dist_backend(self) -> str:
        return "hccl"

    @override
    def prepare_distributed(self, backend: str) -> None:
        if backend == "hccl":
            importlib.import_module(HCCL_MODULE)  # registers 'hccl' with torch.distributed

    @override
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16)

    def is_lazy(self) -> bool:
        """Lazy mode per PT_HPU_LAZY_MODE ("0" eager, "1" lazy; unset: ask the runtime)."""
        flag = os.environ.get("PT_HPU_LAZY_MODE")
        if flag is not None:
            return flag.strip() == "1"
        if CORE_MODULE in sys.modules:
            return bool(getattr(sys.modules[CORE_MODULE], "is_lazy", lambda: False)())
        return False

    @override
    def mark_step(self) -> None:
        if self.is_lazy():
            importlib.import_module(CORE_MODULE).mark_step()

    @override
    def memory_allocated(self, index: int | None = None) -> int | None:
        return torch.hpu.memory_allocated(index) if self._vendor_loaded() else None

    @override
    def max_memory_allocated(self, index: int | None = None) -> int | None:
        return torch.hpu.max_memory_allocated(index) if self._vendor_loaded() else None
