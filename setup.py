"""Build hook: the package list, and the one compiled part of xtp, the CPU fp32/bf16 GEMV
kernel (accelerators/cpu/csrc/*.c, imported as xtp.accelerators.cpu._gemv).

Packages are found, never listed: every folder with an ``__init__.py`` under ``xtp/`` ships,
and the top-level ``accelerators/`` folder (with its subfolders) ships as ``xtp.accelerators``
(tests/package/test_wheel.py proves every module is in the wheel).

The kernel is plain C against Python's headers (no torch at build time) and optional: where no
C compiler is found or it fails to build, the install still succeeds and xtp uses torch's own
paths instead (F.linear for fp32, oneDNN for bf16; `xtp env` says which). Everything else
about the package is in pyproject.toml.
"""

import sys

from setuptools import Extension, find_packages, setup

flags = [] if sys.platform == "win32" else ["-O3", "-std=c11", "-pthread"]

packages = find_packages(include=["xtp", "xtp.*"])
packages += ["xtp.accelerators"] + [f"xtp.accelerators.{p}" for p in find_packages("accelerators")]

setup(
    packages=packages,
    package_dir={"xtp": "xtp", "xtp.accelerators": "accelerators"},
    ext_modules=[
        Extension("xtp.accelerators.cpu._gemv",
                  [f"accelerators/cpu/csrc/{name}.c" for name in ("cpu_gemv", "gemv_kernels",
                                                                  "gemv_pool")],
                  depends=["accelerators/cpu/csrc/gemv.h"], extra_compile_args=flags,
                  extra_link_args=[] if sys.platform == "win32" else ["-pthread"],
                  optional=True),
    ],
)
