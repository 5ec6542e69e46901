"""``xtp env``: in process (fakes where a vendor must look absent) and through the installed
console script in a subprocess (the real machine)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import fakes
from xtp.accelerators import PLUGIN_GROUP, create, reset_accelerator
from xtp.accelerators.devices import registry as registry_module
from xtp.cli.main import main

BUILTINS = ["cuda", "xpu", "hpu", "cpu"]


@pytest.fixture
def fake(monkeypatch, tmp_path):
    stacks = fakes.FakeStacks(monkeypatch, tmp_path)
    yield stacks
    stacks.cleanup()


def run_main(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_env_lists_every_builtin_and_the_selection(fake, capsys):
    rc, out = run_main(capsys, "env")
    assert rc == 0
    lines = out.splitlines()
    for name in BUILTINS:
        assert any(line.startswith(name + " ") for line in lines), name
    assert "selected: cpu (auto-detected)" in out
    assert "collective backends this torch can create: gloo" in out
    assert "built without CUDA" in out or "sees no GPU" in out  # the reason, not just "no"
    assert "-> install" in out  # and the fix


@pytest.mark.parametrize("team", [True, False])
def test_env_json_is_machine_readable(fake, capsys, monkeypatch, team):
    from xtp.accelerators.cpu import gemv

    monkeypatch.setattr(gemv, "team_serves_bf16", lambda: team)  # torch's OpenMP team or not
    monkeypatch.setenv("XTP_DIST_BACKEND", "gloo")
    rc, out = run_main(capsys, "env", "--json")
    assert rc == 0
    info = json.loads(out)
    assert [r["name"] for r in info["accelerators"]] == BUILTINS
    assert info["selected"] == {"name": "cpu", "how": "auto-detected", "error": ""}
    assert info["collective_backends"]["gloo"] is True
    assert info["env"]["XTP_DIST_BACKEND"] == "gloo"
    for key in ("xtp", "torch", "transformers", "python"):
        assert info[key]
    cpu = info["accelerators"][-1]
    assert cpu["available"] and cpu["dist_backend"] == "gloo" and cpu["device_count"] == 1
    # this torch build has oneDNN and the kernel is built on x86-64 (test_cpu_gemv checks it)
    from xtp.accelerators.cpu.gemv import kernel_isa

    assert cpu["linear_packing"] == (
        f"xtp's GEMV kernel ({kernel_isa()}) for bfloat16/float32 at decode (ranks on one "
        "thread" + (", bfloat16 on any number: on torch's OpenMP threads" if team else "")
        + "; XTP_CPU_GEMV_THREADS=N: up to N); oneDNN blocked layout for float16; "
        "weights >= 1 MiB (XTP_CPU_PACK=all: "
        "oneDNN for every dtype, XTP_CPU_PACK=0: off)")


def test_env_says_when_packing_is_switched_off(fake, capsys, monkeypatch):
    monkeypatch.setenv("XTP_CPU_PACK", "0")
    rc, out = run_main(capsys, "env")
    assert rc == 0
    assert "inference packing (cpu): off (XTP_CPU_PACK=0)" in out


def test_env_says_what_is_wrong_with_the_packing_switch(fake, capsys, monkeypatch):
    monkeypatch.setenv("XTP_CPU_PACK", "fp32")
    rc, out = run_main(capsys, "env")
    assert rc == 0
    assert ("inference packing (cpu): not set up: XTP_CPU_PACK='fp32' is not understood; use 1 "
            "(the default: fp32 and bf16 through xtp's GEMV kernel, fp16 packed for oneDNN), all "
            "(every dtype packed for oneDNN), kernel (bf16 through the kernel on AMX CPUs too), "
            "kernel-rows (the same with bf16 weights kept as plain rows) or 0 (no packing)") in out
    assert "cpu (plugin)" not in out


def test_env_shows_fake_xpu_with_its_backend(fake, capsys, monkeypatch):
    fake.xpu(count=2)
    monkeypatch.setattr("torch.distributed.is_xccl_available", lambda: True)
    monkeypatch.setenv("XTP_ACCELERATOR", "xpu")
    rc, out = run_main(capsys, "env")
    assert rc == 0
    assert any(line.split()[:4] == ["xpu", "yes", "2", "xccl"] for line in out.splitlines())
    assert "selected: xpu (XTP_ACCELERATOR)" in out and "XTP_ACCELERATOR=xpu" in out


def test_env_with_absent_xpu_selected_says_what_to_install(fake, capsys, monkeypatch):
    monkeypatch.setenv("XTP_ACCELERATOR", "xpu")
    rc, out = run_main(capsys, "env")
    assert rc != 0
    assert "selected: none -- XTP_ACCELERATOR=xpu selects accelerator 'xpu'" in out
    assert create("xpu").availability().hint in out


def test_env_with_unknown_name_lists_valid_choices(fake, capsys, monkeypatch):
    monkeypatch.setenv("XTP_ACCELERATOR", "nonsense")
    rc, out = run_main(capsys, "env", "--json")
    assert rc != 0
    assert "valid choices: cuda, xpu, hpu, cpu" in json.loads(out)["selected"]["error"]


def test_env_lists_good_and_broken_plugins(fake, capsys, monkeypatch, tmp_path):
    (tmp_path / "xtp_cli_plugin.py").write_text(
        "from xtp.accelerators.devices.cpu import CpuAccelerator\n"
        "class Npu(CpuAccelerator):\n    name = 'clinpu'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = metadata.EntryPoints([
        metadata.EntryPoint("clinpu", "xtp_cli_plugin:Npu", PLUGIN_GROUP),
        metadata.EntryPoint("clibroken", "xtp_no_such_plugin_module:X", PLUGIN_GROUP),
    ])
    real = metadata.entry_points
    monkeypatch.setattr(registry_module.metadata, "entry_points",
                        lambda **kw: eps if kw.get("group") == PLUGIN_GROUP else real(**kw))
    reset_accelerator()
    with pytest.warns(UserWarning, match="clibroken"):
        rc, out = run_main(capsys, "env")
    sys.modules.pop("xtp_cli_plugin", None)
    assert rc == 0
    assert "clinpu (plugin)" in out and "clibroken (plugin)" in out
    assert "plugin failed to load: ModuleNotFoundError" in out
    assert "selected: clinpu (plugin)" in out


def test_no_command_prints_help(capsys):
    rc, out = run_main(capsys)
    assert rc == 2 and "env" in out


# ---- the console script of this install, in a subprocess -----------------------------------


def xtp_script() -> str:
    """The ``xtp`` console script that belongs to the running interpreter."""
    here = Path(sys.executable).parent / "xtp"
    found = str(here) if here.exists() else shutil.which("xtp")
    assert found, "the xtp console script is not installed (pip install -e .)"
    return found


def run_xtp(tmp_path, *argv: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("XTP_")}
    clean.update(env)
    return subprocess.run([xtp_script(), *argv], capture_output=True, text=True, env=clean,
                          cwd=tmp_path, timeout=180)


def test_console_script_env_and_json(tmp_path):
    out = run_xtp(tmp_path, "env")
    assert out.returncode == 0, out.stderr
    assert "selected:" in out.stdout and all(n in out.stdout for n in BUILTINS)
    out = run_xtp(tmp_path, "env", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["selected"]["name"] and info["selected"]["how"] == "auto-detected"


def test_console_script_strict_selection_errors(tmp_path):
    if create("xpu").is_available():
        pytest.skip("this machine has an XPU")
    out = run_xtp(tmp_path, "env", XTP_ACCELERATOR="xpu")
    assert out.returncode != 0
    assert "XTP_ACCELERATOR=xpu selects accelerator 'xpu', but it is not usable here" in out.stdout
    assert "install" in out.stdout
    out = run_xtp(tmp_path, "env", XTP_ACCELERATOR="nonsense")
    assert out.returncode != 0
    assert "valid choices: cuda, xpu, hpu, cpu" in out.stdout


def test_console_script_with_ci_accelerator(tmp_path):
    """tox's select-* envs: `xtp env` succeeds exactly when their accelerator is usable."""
    name = os.environ.get("XTP_CI_ACCELERATOR", "cpu")
    out = run_xtp(tmp_path, "env", "--json", XTP_ACCELERATOR=name)
    info = json.loads(out.stdout)
    if create(name).is_available():
        assert out.returncode == 0 and info["selected"]["name"] == name
    else:
        assert out.returncode != 0 and "not usable here" in info["selected"]["error"]
