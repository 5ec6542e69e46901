"""torch.compile over a sharded model: the class-swapped TP layers trace, outputs unchanged."""

from __future__ import annotations

import pytest
import torch

from ranks import spawn


def _compiled_vs_reference(pack: bool = False):
    import xtp
    from parity_cases import CASES
    from parity_worker import _build
    from xtp.accelerators.cpu import CpuAccelerator
    from xtp.accelerators.cpu_packed_linear import PACKABLE_DTYPES

    case = next(c for c in CASES if c.id == "llama")
    ref, model = _build(case), _build(case)
    xtp.shard(model)
    if pack:  # every weight, however small, fp32 too: the packed matmul must trace
        cpu = CpuAccelerator(pack_min_bytes=0, pack_dtypes=PACKABLE_DTYPES)
        assert xtp.pack_for_inference(model, cpu) > 0
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = torch.compile(model)(ids).logits
    return float((got - want).norm() / want.norm())


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("pack", [False, True], ids=["dense", "packed"])
def test_torch_compile_of_sharded_model_matches_unsharded(pack):
    errors = spawn(_compiled_vs_reference, 2, args=(pack,), timeout=900)
    assert all(e <= 1e-5 for e in errors), errors
