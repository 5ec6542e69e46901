"""A stand-in for xtp's compiled GEMV extension module that counts kernel calls and forwards
them, to prove which products went to the kernel (``xtp.accelerators.cpu_gemv``)."""

from __future__ import annotations


class GemvSpy:
    """Wraps the extension module ``kernel``; ``calls`` counts its ``gemv``, ``gemv_bf16`` and
    ``gemv_bf16_rows`` calls."""

    def __init__(self, kernel) -> None:
        self.kernel, self.calls = kernel, 0
        self.isa = kernel.isa

    def __getattr__(self, name):  # everything else (unpack_bf16, use): the module's own
        return getattr(self.kernel, name)

    def gemv(self, *args):
        self.calls += 1
        return self.kernel.gemv(*args)

    def gemv_bf16(self, *args):
        self.calls += 1
        return self.kernel.gemv_bf16(*args)

    def gemv_bf16_rows(self, *args):
        self.calls += 1
        return self.kernel.gemv_bf16_rows(*args)


def install_gemv_spy() -> GemvSpy:
    """Put a :class:`GemvSpy` in place of the kernel for the rest of this process (for rank
    processes; in the test process use ``monkeypatch``)."""
    from xtp.accelerators.cpu import gemv as cpu_gemv

    spy = GemvSpy(cpu_gemv._kernel)
    cpu_gemv._kernel = spy
    return spy
