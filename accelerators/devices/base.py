"""The ``Accelerator`` interface: a small, capability-based description of one device family.

Required members are abstract; everything else has a default that is correct for a device
without the feature. Constructing an accelerator has no side effects: it imports no vendor
package and changes no torch flag. Vendor imports happen only in :meth:`prepare_distributed`
and when a device is actually used.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist

    from ..comm.base import Communicator
    from ..packed.base import PackedLinear


@dataclass(frozen=True)
class Availability:
    """Whether an accelerator can be used here, and if not, why and how to fix it."""

    available: bool
    reason: str = ""
    hint: str = ""

    def __bool__(self) -> bool:
        return self.available


class Accelerator(abc.ABC):
    """One device family (``cuda``, ``xpu``, ``hpu``, ``cpu`` or a plugin's).

    Class attributes:
        name: registry name, lower case (``"cuda"``).
        device_type: the torch device type string (``torch.device(device_type, i)``).
        visible_devices_env: environment variable that masks devices, if any.
        compiled_decode: whether greedy decode is faster compiled (``torch.compile`` over a
            static KV cache, which replays as device graphs) than eager here; ``xtp run``
            decodes that way by default where it is (measured: ``bench/RESULTS.md``).
    """

    name: ClassVar[str]
    device_type: ClassVar[str]
    visible_devices_env: ClassVar[str | None] = None
    compiled_decode: ClassVar[bool] = False

    # ---- required -------------------------------------------------------------------
    @abc.abstractmethod
    def availability(self) -> Availability:
        """Cheap check that a device is really present (not just that a module imports)."""

    @abc.abstractmethod
    def device_count(self) -> int:
        """Number of devices of this kind visible to this process (0 when unavailable)."""

    @abc.abstractmethod
    def set_device(self, index: int) -> None:
        """Bind this process to device ``index`` (a local rank)."""

    @abc.abstractmethod
    def default_dist_backend(self) -> str:
        """Name of the collective backend to use by default.

        Raises:
            BackendUnavailableError: when no usable backend is installed; the message says
                what to install.
        """

    @abc.abstractmethod
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        """Floating dtypes this device computes in."""

    # ---- defaults ---------------------------------------------------------------------
    def is_available(self) -> bool:
        return self.availability().available

    def device(self, index: int | None = None) -> torch.device:
        """``torch.device`` for ``index`` (the current device when ``None``)."""
        if index is None:
            index = self.current_device()
        return torch.device(self.device_type, index)

    def current_device(self) -> int:
        return 0

    def synchronize(self, index: int | None = None) -> None:
        """Wait for all queued work on the device. No-op for synchronous devices."""

    def prepare_distributed(self, backend: str) -> None:
        """Do the vendor import that registers ``backend`` with torch.distributed, if any."""

    def init_device_id(self, local_index: int) -> torch.device | None:
        """The ``device_id`` to pass to ``init_process_group`` (``None``: pass nothing)."""
        return torch.device(self.device_type, local_index)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def mark_step(self) -> None:
        """Flush a lazily built graph (HPU lazy mode). No-op elsewhere."""

    def memory_allocated(self, index: int | None = None) -> int | None:
        """Bytes currently allocated on the device, or ``None`` when not tracked."""
        return None

    def max_memory_allocated(self, index: int | None = None) -> int | None:
        """Peak bytes allocated since the last reset, or ``None`` when not tracked."""
        return None

    def reset_peak_memory_stats(self, index: int | None = None) -> None:
        """Start a new peak-memory window."""

    def pack_linear_weight(self, weight: torch.Tensor) -> PackedLinear | None:
        """``weight`` (``(out, in)``, on this device) in a faster layout for inference
        matmuls, or ``None`` (the default: keep it dense). See
        :mod:`xtp.accelerators.packed.base`."""
        return None

    def linear_packing(self) -> str:
        """What :meth:`pack_linear_weight` does here, in words (for ``xtp env``)."""
        return "none: weights stay as they are"

    def communicator(self, group: dist.ProcessGroup | None) -> Communicator:
        """The Communicator for ``group``; an accelerator may return a faster one."""
        from ..comm.base import TorchCommunicator

        return TorchCommunicator(group)

    def visible_devices(self) -> str | None:
        """Value of :attr:`visible_devices_env`, if set."""
        return os.environ.get(self.visible_devices_env) if self.visible_devices_env else None

    def describe(self) -> dict:
        """A JSON-able summary used by ``xtp env``."""
        avail = self.availability()
        info: dict = {
            "name": self.name,
            "device_type": self.device_type,
            "available": avail.available,
            "reason": avail.reason,
            "hint": avail.hint,
            "device_count": self.device_count() if avail.available else 0,
        }
        info["linear_packing"] = self.linear_packing()
        try:
            info["dist_backend"] = self.default_dist_backend()
            info["dist_backend_error"] = ""
        except Exception as exc:  # reported, not raised: this is a diagnostic listing
            info["dist_backend"] = None
            info["dist_backend_error"] = str(exc)
        return info

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} device_type={self.device_type!r}>"
