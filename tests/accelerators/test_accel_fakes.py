"""Fakes tier: each built-in accelerator's device calls, against fake vendor runtimes.

These prove that ``CudaAccelerator``, ``XpuAccelerator`` and ``HpuAccelerator`` call the right
torch / vendor functions (device counts, binding, synchronisation, seeds, memory statistics,
HPU lazy mode) -- with monkeypatched ``torch.cuda`` / ``torch.xpu`` and a fake
``habana_frameworks`` package, never on the real hardware. The real-hardware proof is the
contract suite (tests/test_accel_contract.py) wherever such hardware exists.
"""

from __future__ import annotations

import json

import pytest
import torch

import fakes
from xtp.accelerators import Availability, create
from xtp.accelerators.devices.cpu import CpuAccelerator
from xtp.accelerators.devices.cuda import CudaAccelerator
from xtp.accelerators.devices.hpu import HpuAccelerator
from xtp.accelerators.devices.xpu import XpuAccelerator


@pytest.fixture
def fake(monkeypatch, tmp_path):
    stacks = fakes.FakeStacks(monkeypatch, tmp_path)
    yield stacks
    stacks.cleanup()


class Calls:
    """Records calls made to fake runtime functions."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def fn(self, name: str, result=None):
        def call(*args):
            self.log.append((name, *args))
            return result

        return call


# ---- CUDA --------------------------------------------------------------------------------


def test_cuda_calls_torch_cuda_with_fake_cuda(fake, monkeypatch):
    fake.cuda(count=3)
    calls = Calls()
    for name, result in [("set_device", None), ("synchronize", None), ("current_device", 1),
                         ("manual_seed_all", None), ("memory_allocated", 11),
                         ("max_memory_allocated", 22), ("reset_peak_memory_stats", None)]:
        monkeypatch.setattr(torch.cuda, name, calls.fn(name, result))
    acc = CudaAccelerator()
    assert acc.device_count() == 3
    acc.set_device(2)
    acc.synchronize(2)
    assert acc.current_device() == 1 and acc.device() == torch.device("cuda", 1)
    acc.manual_seed_all(7)
    assert acc.memory_allocated(0) == 11 and acc.max_memory_allocated(0) == 22
    acc.reset_peak_memory_stats(0)
    assert ("manual_seed_all", 7) in calls.log  # (torch.manual_seed calls it as well)
    assert [c for c in calls.log if c[0] != "manual_seed_all"] == [
        ("set_device", 2), ("synchronize", 2), ("current_device",), ("current_device",),
        ("memory_allocated", 0),
        ("max_memory_allocated", 0), ("reset_peak_memory_stats", 0)]
    assert torch.bfloat16 in acc.supported_dtypes()
    assert acc.init_device_id(1) == torch.device("cuda", 1)
    assert acc.visible_devices_env == "CUDA_VISIBLE_DEVICES"


def test_cuda_without_bf16_with_fake_cuda(fake, monkeypatch):
    fake.cuda()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert CudaAccelerator().supported_dtypes() == (torch.float32, torch.float16)


def test_cuda_absent_reports_zero_devices(fake):
    assert CudaAccelerator().device_count() == 0


# ---- XPU ---------------------------------------------------------------------------------


def test_xpu_calls_torch_xpu_with_fake_xpu(fake, monkeypatch):
    fake.xpu(count=4)
    calls = Calls()
    for name, result in [("set_device", None), ("synchronize", None), ("current_device", 3),
                         ("manual_seed_all", None), ("memory_allocated", 5),
                         ("max_memory_allocated", 6), ("reset_peak_memory_stats", None)]:
        monkeypatch.setattr(torch.xpu, name, calls.fn(name, result))
    acc = XpuAccelerator()
    assert acc.device_count() == 4
    acc.set_device(3)
    acc.synchronize()
    assert acc.device() == torch.device("xpu", 3)
    acc.manual_seed_all(1)
    assert acc.memory_allocated() == 5 and acc.max_memory_allocated() == 6
    acc.reset_peak_memory_stats()
    assert ("manual_seed_all", 1) in calls.log
    assert [c[0] for c in calls.log if c[0] != "manual_seed_all"] == [
        "set_device", "synchronize", "current_device", "memory_allocated",
        "max_memory_allocated", "reset_peak_memory_stats"]
    assert acc.init_device_id(0) == torch.device("xpu", 0)


def test_xpu_visible_devices_env(fake, monkeypatch):
    monkeypatch.setenv("ZE_AFFINITY_MASK", "0,1")
    assert XpuAccelerator().visible_devices() == "0,1"
    assert CpuAccelerator().visible_devices() is None


# ---- HPU (Gaudi) -------------------------------------------------------------------------


def test_hpu_counts_device_nodes_with_fake_gaudi(fake, monkeypatch):
    fake.hpu(nodes=3)
    acc = HpuAccelerator()
    assert acc.is_available()
    assert acc.device_count() == 3  # the accel_controlD0 node does not count
    monkeypatch.setenv("HABANA_VISIBLE_MODULES", "0, 2")
    assert acc.device_count() == 2
    assert fake.imported() == []


def test_hpu_device_calls_import_the_vendor_stack_with_fake_habana(fake):
    fake.hpu(nodes=2)
    acc = HpuAccelerator()
    assert acc.memory_allocated() is None and acc.max_memory_allocated() is None
    acc.synchronize()  # nothing loaded yet: a no-op that imports nothing
    assert fake.imported() == []
    acc.set_device(1)  # binding a device is where the vendor import happens
    assert "habana_frameworks.torch" in fake.imported()
    assert torch.hpu.current_device() == 1
    acc.synchronize()
    assert acc.memory_allocated() == 0 and acc.max_memory_allocated() == 0
    assert acc.availability() == Availability(True)  # now answered by torch.hpu
    assert acc.device_count() == 2
    assert acc.device(1) == torch.device("hpu", 1)


def test_hpu_loaded_but_no_device_with_fake_habana(fake, monkeypatch):
    fake.hpu(nodes=0)
    HpuAccelerator().set_device(0)
    monkeypatch.setattr(torch.hpu, "is_available", lambda: False)
    avail = HpuAccelerator().availability()
    assert not avail and "torch.hpu sees no Gaudi device" in avail.reason


@pytest.mark.parametrize(("flag", "lazy"), [("1", True), ("0", False), (None, False)])
def test_hpu_mark_step_follows_lazy_mode_with_fake_habana(fake, monkeypatch, flag, lazy):
    fake.hpu()
    if flag is not None:
        monkeypatch.setenv("PT_HPU_LAZY_MODE", flag)
    acc = HpuAccelerator()
    assert acc.is_lazy() is lazy
    acc.mark_step()
    core = "habana_frameworks.torch.core"
    assert (core in fake.imported()) is lazy
    if lazy:
        import sys

        assert sys.modules[core].steps == [1]


def test_hpu_lazy_mode_asks_a_loaded_runtime_with_fake_habana(fake):
    fake.hpu()
    import habana_frameworks.torch.core  # noqa: F401  (the user's program loaded it)

    assert HpuAccelerator().is_lazy() is True


# ---- describe() and the defaults of the base class ------------------------------------------


@pytest.mark.parametrize("name", ["cuda", "xpu", "hpu", "cpu"])
def test_describe_is_json_and_says_why_when_absent(fake, name):
    info = create(name).describe()
    json.dumps(info)
    assert info["name"] == name and info["device_type"] == name
    if name == "cpu":
        assert info["available"] and info["device_count"] == 1 and info["dist_backend"] == "gloo"
    else:
        assert not info["available"] and info["device_count"] == 0 and info["reason"]


def test_describe_reports_a_backend_error_instead_of_raising_with_fake_xpu(fake, monkeypatch):
    fake.xpu()
    monkeypatch.setattr(torch.distributed, "is_xccl_available", lambda: False)
    monkeypatch.setattr("xtp.accelerators.devices.xpu.module_installed", lambda name: False)
    info = XpuAccelerator().describe()
    assert info["available"] and info["dist_backend"] is None
    assert "no collective backend for XPU" in info["dist_backend_error"]


def test_cpu_accelerator_defaults():
    acc = CpuAccelerator()
    assert acc.device() == acc.device(3) == torch.device("cpu")
    assert acc.init_device_id(0) is None  # torch rejects a CPU device_id for gloo
    acc.set_device(0)
    acc.synchronize()
    acc.mark_step()
    acc.reset_peak_memory_stats()
    assert acc.memory_allocated() is None and acc.max_memory_allocated() is None
    acc.manual_seed_all(3)
    a = torch.rand(2)
    acc.manual_seed_all(3)
    assert torch.equal(a, torch.rand(2))
    assert repr(acc) == "<CpuAccelerator name='cpu' device_type='cpu'>"
