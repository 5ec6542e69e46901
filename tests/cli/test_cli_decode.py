"""``xtp run``'s decode mode: compiled static-cache decode only where the accelerator says it
is faster (``Accelerator.compiled_decode``), never on CPU, and ``--eager`` turns it off. (The
compiled path itself runs in the GPU tier: tests/gpu/test_gpu_tier.py.)"""

from __future__ import annotations

import pytest

from xtp.accelerators.devices.registry import create as get_accelerator
from xtp.cli.run import decode_kwargs


class _Compiles:
    compiled_decode = True


@pytest.mark.parametrize("accelerator,eager,static", [
    (_Compiles(), False, True), (_Compiles(), True, False)])
def test_static_cache_only_where_compiled_decode_pays(accelerator, eager, static):
    kw = decode_kwargs(accelerator, 7, eager)
    assert kw["max_new_tokens"] == 7 and kw["do_sample"] is False
    assert ("cache_implementation" in kw) is static
    if static:
        assert kw["cache_implementation"] == "static"


def test_cpu_and_cuda_say_which_decode_is_faster():
    assert get_accelerator("cpu").compiled_decode is False
    assert decode_kwargs(get_accelerator("cpu"), 3, False) == dict(
        max_new_tokens=3, do_sample=False, pad_token_id=0)
    from xtp.accelerators.devices.cuda import CudaAccelerator

    assert CudaAccelerator.compiled_decode is True
