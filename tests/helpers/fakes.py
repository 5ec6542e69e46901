"""Fake vendor stacks for the *fakes* tier: no XPU, HPU or NVIDIA GPU is involved.

Two kinds of fake:

* **Runtime fakes** (monkeypatched ``torch.cuda`` / ``torch.xpu`` / ``torch.version.cuda`` and
  Gaudi device nodes in a temporary folder) make an accelerator *look present* to detection.
* **Fake vendor packages** written to a temporary folder on ``sys.path``:
  ``intel_extension_for_pytorch``, ``oneccl_bindings_for_pytorch`` and ``habana_frameworks``
  (``.torch``, ``.torch.core``, ``.torch.distributed.hccl``). Each one, when imported, appends
  its name to the file named by ``XTP_FAKE_VENDOR_LOG``, so a test can prove that detection
  never imported it. With ``XTP_FAKE_VENDOR_GLOO=1`` the fake ``hccl`` / ``oneccl`` modules do
  what the real ones do on import -- register their backend name with torch.distributed --
  except that the backend they register is plain gloo, so xtp's real init path can run real
  collectives under the vendor's backend name. ``XTP_FAKE_ONECCL_BROKEN=1`` makes the fake
  oneCCL bindings fail to import the way the real ones do on a torch version mismatch.

A test that passes with these fakes proves xtp's *selection and wiring* for that vendor;
it never counts as running on that vendor's hardware.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import torch

#: top-level names of the vendor packages that detection must never import
VENDOR_TOPS = ("intel_extension_for_pytorch", "oneccl_bindings_for_pytorch", "habana_frameworks")

ENV_LOG = "XTP_FAKE_VENDOR_LOG"
ENV_GLOO = "XTP_FAKE_VENDOR_GLOO"
ENV_ONECCL_BROKEN = "XTP_FAKE_ONECCL_BROKEN"

_RECORD = """\
import os as _os
if _os.environ.get("XTP_FAKE_VENDOR_LOG"):
    with open(_os.environ["XTP_FAKE_VENDOR_LOG"], "a") as _f:
        _f.write(__name__ + "\\n")
"""

_GLOO_CREATOR = """\
def _create_over_gloo(store, rank, size, timeout):
    import torch.distributed as dist
    return dist.ProcessGroupGloo(store, rank, size, timeout)
"""

_FILES: dict[str, str] = {
    "intel_extension_for_pytorch/__init__.py": _RECORD,
    "oneccl_bindings_for_pytorch/__init__.py": _RECORD + """
if _os.environ.get("XTP_FAKE_ONECCL_BROKEN"):
    raise ImportError("fake oneccl_bindings_for_pytorch: built for another torch version")
""" + _GLOO_CREATOR + """
if _os.environ.get("XTP_FAKE_VENDOR_GLOO"):
    import torch.distributed as _dist
    _dist.Backend.register_backend("ccl", _create_over_gloo, devices=["cpu", "xpu"])
""",
    "habana_frameworks/__init__.py": _RECORD,
    "habana_frameworks/torch/__init__.py": _RECORD + """
import types as _types
import torch as _torch

_state = {"device": 0, "synchronized": 0}
_torch.hpu = _types.SimpleNamespace(
    is_available=lambda: True,
    device_count=lambda: 2,
    set_device=lambda i: _state.__setitem__("device", i),
    current_device=lambda: _state["device"],
    synchronize=lambda: _state.__setitem__("synchronized", _state["synchronized"] + 1),
    memory_allocated=lambda i=None: 0,
    max_memory_allocated=lambda i=None: 0,
)
if _os.environ.get("XTP_FAKE_VENDOR_GLOO"):
    # what the real stack does: HPU becomes torch's accelerator, so a device_id of hpu:N
    # passes init_process_group's check
    _torch.accelerator.current_accelerator = lambda check_available=False: _torch.device("hpu")
    _torch.accelerator.device_count = lambda: 2
""",
    "habana_frameworks/torch/core/__init__.py": _RECORD + """
steps = []
def mark_step():
    steps.append(1)
def is_lazy():
    return True
""",
    "habana_frameworks/torch/distributed/__init__.py": _RECORD,
    "habana_frameworks/torch/distributed/hccl.py": _RECORD + _GLOO_CREATOR + """
if _os.environ.get("XTP_FAKE_VENDOR_GLOO"):
    import torch.distributed as _dist
    _dist.Backend.register_backend("hccl", _create_over_gloo, devices=["cpu", "hpu"])
""",
}


def write_vendor_packages(root: Path, only: tuple[str, ...] = VENDOR_TOPS) -> Path:
    """Write the fake vendor packages whose top-level name is in ``only`` under ``root``."""
    for rel, text in _FILES.items():
        if rel.split("/")[0] not in only:
            continue
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def imported_log(log: Path) -> list[str]:
    """Names of fake vendor modules imported so far (from the log file)."""
    return log.read_text().split() if log.exists() else []


def loaded_vendor_modules() -> list[str]:
    """Vendor modules currently in ``sys.modules``."""
    return sorted(m for m in sys.modules if m.split(".")[0] in VENDOR_TOPS)


def write_gaudi_nodes(folder: Path, count: int) -> tuple[str, ...]:
    """Create ``count`` fake Gaudi device nodes (plus a control node, which must not count)
    and return glob patterns for :attr:`HpuAccelerator.device_node_globs`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"accel{i}").touch()
    (folder / "accel_controlD0").touch()
    return (str(folder / "accel[0-9]*"), str(folder / "hl[0-9]*"))


# ---- in-process fakes (undone by monkeypatch and FakeStacks.cleanup) ----------------------


class FakeStacks:
    """In-process fakes for one test. On creation *nothing* is present -- no CUDA GPU, no XPU,
    no Gaudi stack -- whatever this machine really has, so the tests mean the same everywhere.
    ``cuda()``, ``xpu()``, ``hpu()`` make one present; ``install_vendor_packages()`` puts fake
    vendor packages on ``sys.path``. Call :meth:`cleanup` at the end (the fixture does)."""

    def __init__(self, monkeypatch, tmp_path: Path) -> None:
        from xtp.accelerators import _torch_compat
        from xtp.accelerators.devices import hpu as hpu_module
        from xtp.accelerators.devices.hpu import HpuAccelerator

        self.mp, self.tmp = monkeypatch, tmp_path
        self.root = tmp_path / "vendor"
        self.log = tmp_path / "vendor-imports.log"
        self._on_path = False
        self._had_hpu = hasattr(torch, "hpu")
        self._accel_funcs = (torch.accelerator.current_accelerator, torch.accelerator.device_count)
        self._backend_attrs: set[str] | None = None
        mp = monkeypatch
        mp.setenv(ENV_LOG, str(self.log))
        for var in (ENV_GLOO, ENV_ONECCL_BROKEN, "HABANA_VISIBLE_MODULES", "PT_HPU_LAZY_MODE"):
            mp.delenv(var, raising=False)
        mp.setattr(torch.cuda, "is_available", lambda: False)
        mp.setattr(torch.cuda, "device_count", lambda: 0)
        mp.setattr(torch.xpu, "is_available", lambda: False)
        mp.setattr(torch.xpu, "device_count", lambda: 0)
        mp.setattr(HpuAccelerator, "device_node_globs", (str(tmp_path / "no-nodes" / "accel*"),))
        real = _torch_compat.module_installed
        # habana_frameworks counts as installed only when our fake is on sys.path
        mp.setattr(hpu_module, "module_installed",
                   lambda name: self._habana_on_path() and real(name))

    def _habana_on_path(self) -> bool:
        return self._on_path and (self.root / "habana_frameworks").is_dir()

    def install_vendor_packages(self, *tops: str) -> Path:
        """Put fake vendor packages (default: all of them) first on ``sys.path``."""
        write_vendor_packages(self.root, tops or VENDOR_TOPS)
        if not self._on_path:
            self.mp.syspath_prepend(str(self.root))
            self._on_path = True
        return self.root

    def cuda(self, count: int = 2) -> None:
        """A CUDA build of torch that sees ``count`` GPUs (0: a CUDA build on a GPU-less host)."""
        self.mp.setattr(torch.version, "cuda", "12.8")
        self.mp.setattr(torch.cuda, "is_available", lambda: count > 0)
        self.mp.setattr(torch.cuda, "device_count", lambda: count)
        self.mp.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    def cuda_not_built(self) -> None:
        """A torch built without CUDA (and without ROCm)."""
        self.mp.setattr(torch.version, "cuda", None)
        self.mp.setattr(torch.version, "hip", None, raising=False)

    def xpu(self, count: int = 2) -> None:
        """A torch whose ``torch.xpu`` sees ``count`` Intel GPUs."""
        self.mp.setattr(torch.xpu, "is_available", lambda: True)
        self.mp.setattr(torch.xpu, "device_count", lambda: count)

    def hpu(self, nodes: int = 2, installed: bool = True) -> None:
        """Gaudi: ``habana_frameworks`` installed (a fake on sys.path), ``nodes`` device nodes."""
        from xtp.accelerators.devices.hpu import HpuAccelerator

        if installed:
            self.install_vendor_packages("habana_frameworks")
        globs = write_gaudi_nodes(self.tmp / "dev", nodes)
        self.mp.setattr(HpuAccelerator, "device_node_globs", globs)

    def scratch_backend_registry(self) -> None:
        """Let fake vendor imports register backends into a copy of torch's backend table."""
        import torch.distributed as dist

        B = dist.Backend
        self._backend_attrs = set(vars(B))
        for attr in ("backend_list", "default_device_backend_map", "backend_capability",
                     "backend_type_map", "_plugins"):
            value = getattr(B, attr)
            self.mp.setattr(B, attr, list(value) if isinstance(value, list) else dict(value))
        self.mp.setenv(ENV_GLOO, "1")

    def imported(self) -> list[str]:
        return imported_log(self.log)

    def cleanup(self) -> None:
        import torch.distributed as dist

        for name in loaded_vendor_modules():
            del sys.modules[name]
        if not self._had_hpu and hasattr(torch, "hpu"):
            del torch.hpu
        torch.accelerator.current_accelerator, torch.accelerator.device_count = self._accel_funcs
        if self._backend_attrs is not None:
            for attr in set(vars(dist.Backend)) - self._backend_attrs:
                delattr(dist.Backend, attr)


# ---- runtime fakes used inside spawned ranks (the process ends afterwards) -----------------


def install_fake_xpu_runtime(count: int = 2) -> None:
    """Make this process's torch look like an XPU build with ``count`` devices (ranks only)."""
    state = {"device": 0}
    torch.xpu.is_available = lambda: True
    torch.xpu.device_count = lambda: count
    torch.xpu.set_device = lambda i: state.__setitem__("device", int(i))
    torch.xpu.current_device = lambda: state["device"]
    torch.xpu.synchronize = lambda i=None: None
    torch.accelerator.current_accelerator = lambda check_available=False: torch.device("xpu")
    torch.accelerator.device_count = lambda: count


class _XcclOverGloo:
    """Stands in for ``ProcessGroupXCCL``: same constructor, returns a gloo backend."""

    class Options:
        def __init__(self) -> None:
            self.global_ranks_in_group = None
            self.group_name = None
            self._timeout = None

    def __new__(cls, store, rank, size, options):
        import torch.distributed as dist

        return dist.ProcessGroupGloo(store, rank, size, options._timeout)


def alias_backend_over_gloo(name: str) -> None:
    """Make ``name`` a torch.distributed backend that is really gloo, in this process (ranks only).

    ``hccl`` and ``ccl`` go through the public ``Backend.register_backend``. ``xccl`` is
    built into torch's process-group code (it never reaches the plugin table), so for it
    the XCCL availability check and ``ProcessGroupXCCL`` are swapped for gloo instead.
    """
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    if name == "xccl":
        dist.is_xccl_available = lambda: True
        c10d.is_xccl_available = lambda: True
        c10d.ProcessGroupXCCL = _XcclOverGloo
        dist.Backend.backend_capability["xccl"] = ["cpu", "xpu"]
        return

    def create(store, rank, size, timeout):
        return dist.ProcessGroupGloo(store, rank, size, timeout)

    dist.Backend.register_backend(name, create, devices=["cpu"])


def vendor_env(root: Path, log: Path, **extra: str) -> dict[str, str]:
    """Environment for a spawned rank that should see the fake vendor packages."""
    env = {ENV_LOG: str(log), ENV_GLOO: "1", "XTP_FAKE_VENDOR_ROOT": str(root)}
    env.update(extra)
    return env


def enter_vendor_root() -> None:
    """In a spawned rank: put ``XTP_FAKE_VENDOR_ROOT`` first on ``sys.path``."""
    root = os.environ.get("XTP_FAKE_VENDOR_ROOT")
    if root and root not in sys.path:
        sys.path.insert(0, root)
