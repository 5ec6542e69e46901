"""torch.compile over a sharded model: the class-swapped TP layers trace, outputs unchanged."""

from __future__ import annotations

import pytest
import torch

from ranks import spawn


def _compiled_vs_reference():
    import xtp
    from parity_cases import CASES
    from parity_worker import _build

    case = next(c for c in CASES if c.id == "llama")
    ref, model = _build(case), _build(case)
    xtp.shard(model)
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = torch.compile(model)(ids).logits
    return float((got - want).norm() / want.norm())


@pytest.mark.slow
@pytest.mark.distributed
def test_torch_compile_of_sharded_model_matches_unsharded():
    errors = spawn(_compiled_vs_reference, 2, timeout=900)
    assert all(e <= 1e-5 for e in errors), errors
