"""Packaging: the built wheel installs into a fresh virtual environment and works there.

The top-level folder ``accelerators/`` must end up as ``xtp/accelerators`` inside the wheel
(setuptools ``package-dir`` mapping); an editable install can hide a mistake there, a wheel
cannot. The venv sees this interpreter's torch and transformers (``--system-site-packages``,
plus a ``.pth`` naming this interpreter's own site-packages when it runs inside a venv) so
nothing large is downloaded; xtp itself comes only from the wheel (checked by file path).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns(".git", ".tox", ".venv*", "venv", "build", "dist", "*.egg-info",
                                "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
                                ".whl", ".gl")


def _copy_sources(dest: Path) -> Path:
    """The files git would ship (tracked + untracked-not-ignored), else a filtered copy."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, check=True, timeout=60,
        ).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, dest, ignore=IGNORE)
        return dest
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("XTP_", "PYTHONPATH", "VIRTUAL_ENV"))}


def _run(cmd, cwd, **extra) -> subprocess.CompletedProcess:
    env = _clean_env()
    env.update(extra)
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


X86_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"


def _build_wheel(work: Path, **env) -> Path:
    src = _copy_sources(work / "src")
    out = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", work / "dist", src],
               cwd=work, **env)
    assert out.returncode == 0, out.stdout + out.stderr
    (built,) = (work / "dist").glob("xtp-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def _venv_with(wheel: Path, root: Path) -> Path:
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(root)
    py = root / "bin" / "python"
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=root).stdout.strip()
    if sys.prefix != sys.base_prefix:  # inside a venv (tox, .ci/run): see its torch as well
        ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
        Path(purelib, "zz_parent_site.pth").write_text("\n".join(ours) + "\n")
    # --ignore-installed: an xtp already visible through the parent's site-packages (tox's
    # wheel env) must not make pip skip the install into this venv
    out = _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps",
                "--no-index", "--ignore-installed", wheel], cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
    return root


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    return _venv_with(wheel, tmp_path_factory.mktemp("venv") / "venv")


#: `xtp env --json` with any editable install of xtp the base interpreter has made invisible:
#: its import finder would otherwise supply modules the wheel lacks from the checkout
ENV_WITHOUT_EDITABLE = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path"
    " if not getattr(f, '__module__', '').startswith('__editable__')];"
    "from xtp.cli.main import main; sys.exit(main(['env', '--json']))")


def _packing_line(venv_root: Path, cwd: Path) -> str:
    out = _run([venv_root / "bin" / "python", "-c", ENV_WITHOUT_EDITABLE], cwd=cwd)
    assert out.returncode == 0, out.stderr
    (cpu,) = [r for r in json.loads(out.stdout)["accelerators"] if r["name"] == "cpu"]
    return cpu["linear_packing"]


@pytest.mark.skipif(not X86_LINUX, reason="the GEMV kernel is built for x86-64 Linux here")
def test_wheel_carries_the_compiled_gemv_kernel(wheel, fresh_venv, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.startswith("xtp/accelerators/cpu/_gemv.")
            and n.endswith(".so")], names
    assert "xtp's GEMV kernel (avx" in _packing_line(fresh_venv, tmp_path)


def test_wheel_builds_and_works_without_a_c_compiler(tmp_path):
    """The kernel is optional: with no working compiler the install still succeeds, and
    fp32 stays on torch's F.linear (``xtp env`` says why)."""
    built = _build_wheel(tmp_path / "w", CC="false", LDSHARED="false")
    assert not [n for n in zipfile.ZipFile(built).namelist() if "/_gemv." in n]
    root = _venv_with(built, tmp_path / "venv")
    line = _packing_line(root, tmp_path)
    assert line.startswith("no GEMV kernel (the compiled kernel is not installed ("), line
    assert "): float32 dense; oneDNN blocked layout for float16/bfloat16;" in line, line


def _source_modules() -> set[str]:
    """Each module of the checkout, as its path in the wheel (accelerators/ is mapped)."""
    out = {p.relative_to(REPO).as_posix() for p in (REPO / "xtp").rglob("*.py")}
    out |= {"xtp/" + p.relative_to(REPO).as_posix() for p in (REPO / "accelerators").rglob("*.py")}
    return out


def test_wheel_contains_every_module_of_every_subpackage(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_source_modules() - names)
    assert not missing, f"modules missing from the wheel: {missing}"
    for package in ("devices", "comm", "cpu", "packed"):  # the mapped folder's own subpackages
        assert f"xtp/accelerators/{package}/__init__.py" in names
    assert "xtp/cli/main.py" in names and "xtp/distributed/setup.py" in names
    assert not [n for n in names if n.startswith(("accelerators/", "tests/"))]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "xtp = xtp.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_imports_from_the_venv_not_the_checkout(fresh_venv, tmp_path):
    code = ("import json, xtp, xtp.accelerators as a, xtp.distributed;"
            "print(json.dumps([xtp.__file__, a.__file__, a.get_accelerator().name,"
            " sorted(a.BUILTINS)]))")
    out = _run([fresh_venv / "bin" / "python", "-c", code], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    xtp_file, acc_file, selected, builtins = json.loads(out.stdout)
    assert Path(xtp_file).resolve().is_relative_to(fresh_venv.resolve())
    assert Path(acc_file).resolve().is_relative_to(fresh_venv.resolve())
    assert Path(acc_file).parts[-3:] == ("xtp", "accelerators", "__init__.py")
    assert selected == "cpu" or selected in builtins
    assert builtins == ["cpu", "cuda", "hpu", "xpu"]


def test_wheel_console_script_xtp_env(fresh_venv, tmp_path):
    xtp = fresh_venv / "bin" / "xtp"
    out = _run([xtp, "env"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "selected:" in out.stdout
    out = _run([xtp, "env", "--json"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert [r["name"] for r in info["accelerators"]][:4] == ["cuda", "xpu", "hpu", "cpu"]
    assert info["selected"]["name"]


def test_wheel_console_script_strict_errors(fresh_venv, tmp_path):
    xtp = fresh_venv / "bin" / "xtp"
    out = _run([xtp, "env"], cwd=tmp_path, XTP_ACCELERATOR="xpu")
    if out.returncode == 0:
        pytest.skip("this machine has a usable XPU")
    assert "XTP_ACCELERATOR=xpu selects accelerator 'xpu', but it is not usable here" in out.stdout
    assert "install" in out.stdout.split("XTP_ACCELERATOR=xpu selects", 1)[1]
    out = _run([xtp, "env"], cwd=tmp_path, XTP_ACCELERATOR="nonsense")
    assert out.returncode != 0
    assert "valid choices: cuda, xpu, hpu, cpu" in out.stdout
