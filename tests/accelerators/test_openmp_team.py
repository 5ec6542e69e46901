"""Finding torch's OpenMP runtime for the GEMV kernel's team mode, and the settings around it:
``XTP_CPU_GEMV_TEAM`` and ``XTP_CPU_PACK=kernel`` (unit tests, no kernel needed)."""

from __future__ import annotations

import os

import pytest
import torch

from xtp.accelerators import env
from xtp.accelerators.cpu import packed_linear
from xtp.accelerators.cpu.openmp_team import follows_torch, gomp_parallel_address, loaded_runtimes
from xtp.accelerators.errors import EnvSettingError

MAPS = """\
7f00-7f01 r-xp 00000000 08:01 11 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0
7f01-7f02 r--p 00000000 08:01 12 /venv/site-packages/torch/lib/libgomp.so.1
7f02-7f03 r-xp 00001000 08:01 12 /venv/site-packages/torch/lib/libgomp.so.1
7f03-7f04 r-xp 00000000 08:01 13 /opt/intel/lib/libiomp5.so
7f04-7f05 r-xp 00000000 08:01 14 /venv/site-packages/torch/lib/libtorch_cpu.so
7f05-7f06 rw-p 00000000 00:00 0
7f06-7f07 r-xp 00000000 08:01 15 /usr/lib/libgompish-helper.txt
"""


def test_runtimes_are_listed_once_torchs_first():
    assert loaded_runtimes(MAPS, "/venv/site-packages") == [
        "/venv/site-packages/torch/lib/libgomp.so.1",
        "/usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0", "/opt/intel/lib/libiomp5.so"]
    assert loaded_runtimes(MAPS)[0] == "/usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0"
    assert loaded_runtimes("7f05-7f06 rw-p 00000000 00:00 0\n") == []


def test_a_runtime_whose_thread_setting_does_not_follow_torchs_is_not_torchs():
    """Another copy of the runtime keeps its own thread count: refused; torch's count is
    restored after the probe either way."""
    class OtherCopy:
        @staticmethod
        def omp_get_max_threads():
            return 5

    before = torch.get_num_threads()
    assert not follows_torch(OtherCopy())
    assert not follows_torch(object())  # no omp_get_max_threads at all
    assert torch.get_num_threads() == before


SYSTEM_GOMP = "/usr/lib/x86_64-linux-gnu/libgomp.so.1"


@pytest.mark.skipif(not os.path.exists(SYSTEM_GOMP), reason=f"no {SYSTEM_GOMP} on this machine")
def test_a_second_copy_of_libgomp_in_the_process_is_never_chosen():
    """A second libgomp loaded by another package (here the system's, beside the one torch
    bundles) is a separate runtime with its own threads: products run on it would start a
    second team. It fails the probe, and the address found is still torch's."""
    import ctypes

    other = ctypes.CDLL(SYSTEM_GOMP)  # RTLD_LOCAL: loaded, but not where torch binds
    assert not follows_torch(other)
    assert follows_torch(ctypes.CDLL(None))
    found = gomp_parallel_address()
    assert found == ctypes.cast(ctypes.CDLL(None).GOMP_parallel, ctypes.c_void_p).value
    assert found != ctypes.cast(other.GOMP_parallel, ctypes.c_void_p).value


@pytest.mark.parametrize("value,on", [("", True), ("1", True), ("ON", True), ("0", False),
                                      ("no", False)])
def test_gemv_team_setting(monkeypatch, value, on):
    monkeypatch.setenv("XTP_CPU_GEMV_TEAM", value)
    assert env.gemv_team() is on


def test_gemv_team_setting_refuses_other_values(monkeypatch):
    monkeypatch.setenv("XTP_CPU_GEMV_TEAM", "maybe")
    with pytest.raises(EnvSettingError, match=r"^XTP_CPU_GEMV_TEAM='maybe' is not on or off; "
                                              r"set XTP_CPU_GEMV_TEAM=1 \(torch's OpenMP "
                                              r"threads\) or 0 \(the kernel's own threads\)$"):
        env.gemv_team()


@pytest.mark.parametrize("threads,on_team,layout", [
    (1, True, packed_linear.ONEDNN),   # one thread: oneDNN's AMX tiles won there
    (8, True, packed_linear.GEMV),     # several threads on torch's team: the kernel won there
    (8, False, packed_linear.ONEDNN),  # several threads, no team (XTP_CPU_GEMV_TEAM=0, ...)
])
def test_amx_cpus_keep_bf16_for_the_kernel_only_on_torchs_team(monkeypatch, threads, on_team,
                                                                layout):
    from xtp.accelerators.cpu import gemv

    if gemv.unavailable_reason():
        pytest.skip(f"no kernel here: {gemv.unavailable_reason()}")
    monkeypatch.setattr(packed_linear, "cpu_has_amx_bf16", lambda: True)
    monkeypatch.setattr(packed_linear.torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(gemv, "team_serves_bf16", lambda: on_team)
    monkeypatch.delenv("XTP_CPU_PACK", raising=False)
    assert packed_linear.env_layouts()[torch.bfloat16] == layout
    assert packed_linear.env_layouts()[torch.float32] == packed_linear.GEMV


def test_pack_kernel_keeps_the_kernels_layouts_on_amx_cpus(monkeypatch):
    monkeypatch.setattr(packed_linear, "cpu_has_amx_bf16", lambda: True)
    monkeypatch.setattr(packed_linear.torch, "get_num_threads", lambda: 1)
    monkeypatch.delenv("XTP_CPU_PACK", raising=False)
    assert packed_linear.env_layouts()[torch.bfloat16] == packed_linear.ONEDNN
    monkeypatch.setenv("XTP_CPU_PACK", "kernel")
    assert packed_linear.env_layouts() == packed_linear.DEFAULT_LAYOUTS
    assert packed_linear.env_layouts()[torch.bfloat16] == packed_linear.GEMV
