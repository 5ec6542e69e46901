"""Finding torch's OpenMP runtime for the GEMV kernel's team mode, and the settings around it:
``XTP_CPU_GEMV_TEAM`` and ``XTP_CPU_PACK=kernel`` (unit tests, no kernel needed)."""

from __future__ import annotations

import pytest
import torch

from xtp.accelerators import env
from xtp.accelerators.cpu import packed_linear
from xtp.accelerators.cpu.openmp_team import loaded_runtimes
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


def test_pack_kernel_keeps_the_kernels_layouts_on_amx_cpus(monkeypatch):
    monkeypatch.setattr(packed_linear, "cpu_has_amx_bf16", lambda: True)
    monkeypatch.delenv("XTP_CPU_PACK", raising=False)
    assert packed_linear.env_layouts()[torch.bfloat16] == packed_linear.ONEDNN
    monkeypatch.setenv("XTP_CPU_PACK", "kernel")
    assert packed_linear.env_layouts() == packed_linear.DEFAULT_LAYOUTS
    assert packed_linear.env_layouts()[torch.bfloat16] == packed_linear.GEMV
