"""Build hook for the one compiled part of xtp: the CPU fp32/bf16 GEMV kernel
(accelerators/cpu/csrc/cpu_gemv.c, imported as xtp.accelerators.cpu._gemv).

It is plain C against Python's headers (no torch at build time) and optional: where no C
compiler is found or it fails to build, the install still succeeds and xtp uses torch's own
paths instead (F.linear for fp32, oneDNN for bf16; `xtp env` says which). Everything else about the package is in
pyproject.toml.
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-std=c11"]

setup(ext_modules=[
    Extension("xtp.accelerators.cpu._gemv", ["accelerators/cpu/csrc/cpu_gemv.c"],
              extra_compile_args=flags, optional=True)
])
