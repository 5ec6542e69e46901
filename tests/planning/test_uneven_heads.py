"""Any tp size up to the number of query heads (issue 17): uneven query heads, KV heads
replicated on every rank whose queries use them, also when tp neither divides nor is a multiple
of the KV head count.

Tier: numeric checks in one process with thread-ranks (tests/helpers/thread_ranks.py, fp32,
relative error <= 1e-5 against the unsharded model, and the replicated KV rows' gradients summed
back to the unsharded model's); the real-process proof at tp 3 with 2 KV heads is the parity
suite's ``*_kv2_tp3`` cases (tests/sharding/test_parity.py).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import xtp
from thread_ranks import rel_err, run_sharded

TOL = 1e-5
V = 101
C = transformers.CONFIG_MAPPING


def llama(heads: int, kv: int, head_dim: int = 4):
    return C["llama"](hidden_size=heads * head_dim, intermediate_size=40, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=V,
                      max_position_embeddings=32)


def falcon_grouped(heads: int, kv: int, head_dim: int = 4):
    return C["falcon"](hidden_size=heads * head_dim, num_attention_heads=heads,
                       num_hidden_layers=1, vocab_size=V, new_decoder_architecture=True,
                       num_kv_heads=kv, alibi=False)


SHAPES = [
    pytest.param(llama, 32, 8, 6, id="llama-32h-8kv-tp6"),
    pytest.param(llama, 12, 4, 5, id="llama-12h-4kv-tp5"),
    pytest.param(llama, 4, 2, 3, id="llama-4h-2kv-tp3"),
    pytest.param(llama, 12, 3, 4, id="llama-12h-3kv-tp4"),
    pytest.param(falcon_grouped, 12, 4, 5, id="falcon-grouped-12h-4kv-tp5"),
    pytest.param(falcon_grouped, 32, 8, 6, id="falcon-grouped-32h-8kv-tp6"),
]


def _model(make, heads, kv):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(make(heads, kv)).eval()


@pytest.mark.parametrize("make,heads,kv,tp", SHAPES)
def test_uneven_heads_match_unsharded(make, heads, kv, tp):
    model = _model(make, heads, kv)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    plan = xtp.plan(model, tp)
    outs = run_sharded(model, tp, lambda m: m(ids).logits, plan=plan)
    assert max(rel_err(o, want) for o in outs) <= TOL
    # no idle rank: every rank holds query heads of every attention layer
    for spec in plan.specs:
        if spec.is_sharded:
            assert all(spec.local_extent(r) > 0 for r in range(tp)), spec.name


def test_replicated_kv_rows_get_the_full_gradient():
    """KV head 0 sits on ranks 0 and 1 (4 heads, 2 KV heads, tp 3): each computes only its own
    query head's part of k_proj's gradient; the shared-rows hook sums them."""
    model = _model(llama, 4, 2)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    model(ids).logits.square().sum().backward()
    want = model.model.layers[0].self_attn.k_proj.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    D = 4

    def grad(m):
        with torch.enable_grad():
            m(ids).logits.square().sum().backward()
        return m.model.layers[0].self_attn.k_proj.weight.grad

    got = run_sharded(model, 3, grad)
    for r, kv_head in enumerate([0, 0, 1]):
        assert rel_err(got[r], want[kv_head * D:(kv_head + 1) * D]) <= TOL


def test_plan_shows_the_kv_replication():
    plan = xtp.plan(llama(4, 2, head_dim=16), 3)
    text = str(plan)
    assert ("note: 2 KV heads over 3 ranks: each KV head is replicated on the ranks whose "
            "query heads use it (rank 0: q 0 kv 0, rank 1: q 1 kv 0, rank 2: q 2-3 kv 1)"
            ) in text
    k = plan.spec("model.layers.0.self_attn.k_proj")
    assert [k.local_extent(r) for r in range(3)] == [16, 16, 16]
