"""Plain PyTorch models (tests/helpers/scratch_models.py: no transformers, no config): head
counts from the forward's views into heads, or given explicitly (issue 17).

Tier: plans on the models themselves (in-process); the real-process parity at tp 2 and 3 is
tests/sharding/test_parity.py::test_plain_pytorch_model_matches_unsharded.
"""

from __future__ import annotations

import pytest

import scratch_models
from xtp.errors import PlanError, UnclassifiedModuleError
from xtp.planning.derive import derive_plan
from xtp.planning.spec import Layout, Role


@pytest.mark.parametrize("name,shape", [("nanogpt", (6, 6, 8)), ("scratch_llama", (6, 2, 8))])
def test_head_shape_from_the_forward(name, shape):
    assert derive_plan(scratch_models.build(name), 2).head_shape == shape


def test_nanogpt_fused_c_attn_and_its_width_attribute():
    """c_attn is split by self.n_embd: the layout is QKV_CONCAT, and n_embd (in no table)
    becomes the local width because the forward used it as a split size."""
    plan = derive_plan(scratch_models.build("nanogpt"), 3)
    c_attn = plan.spec("h.0.attn.c_attn")
    assert (c_attn.role, c_attn.layout) == (Role.COLUMN, Layout.QKV_CONCAT)
    updates = {(u.module, u.attr): u.values for u in plan.attr_updates}
    assert updates[("h.0.attn", "n_embd")] == (16, 16, 16)
    assert updates[("h.0.attn", "n_head")] == (2, 2, 2)


def test_forward_that_hides_the_query_heads_needs_explicit_heads():
    model = scratch_models.build("scratch_llama_prescaled")
    with pytest.raises(UnclassifiedModuleError, match=r"heads=\.\.\., kv_heads=\.\.\."):
        derive_plan(model, 3)
    plan = derive_plan(model, 3, heads=6, kv_heads=2)
    assert plan.head_shape == (6, 2, 8)
    assert [plan.spec("layers.0.attention.wq").local_extent(r) for r in range(3)] == [16, 8, 24]


def test_explicit_heads_that_do_not_group():
    with pytest.raises(PlanError, match="kv_heads=4"):
        derive_plan(scratch_models.build("scratch_llama"), 2, heads=6, kv_heads=4)


def test_public_plan_takes_explicit_heads_like_shard():
    """xtp.plan(model, tp, heads=, kv_heads=) plans what xtp.shard(model, heads=, kv_heads=)
    shards; without them the same model is refused with the hint to pass them."""
    import xtp

    model = scratch_models.build("scratch_llama_prescaled")
    with pytest.raises(UnclassifiedModuleError, match=r"heads=\.\.\., kv_heads=\.\.\."):
        xtp.plan(model, 3)
    plan = xtp.plan(model, 3, heads=6, kv_heads=2)
    assert plan == derive_plan(model, 3, heads=6, kv_heads=2)
    assert plan.head_shape == (6, 2, 8)
    with pytest.raises(PlanError, match="kv_heads=4"):
        xtp.plan(model, 3, heads=6, kv_heads=4)


def test_experts_as_a_module_list_are_split_one_mlp_pair_each():
    """scratch_moe: every expert's w1/w3 -> w2 is a pair of its own (one all-reduce each), the
    shared expert too; the router and the shared expert's gate (narrow outputs that join the
    routing, not a row layer) stay whole."""
    plan = derive_plan(scratch_models.build("scratch_moe"), 3)
    moe = "layers.0.moe."
    for e in range(4):
        assert plan.spec(f"{moe}experts.{e}.w1").role == Role.COLUMN
        assert plan.spec(f"{moe}experts.{e}.w2").role == Role.ROW
    assert [plan.spec(moe + "shared_expert.w2").local_extent(r) for r in range(3)] == [32, 24, 24]
    for name in ("router", "shared_gate"):
        assert plan.spec(moe + name).role == Role.REPLICATE
    # 2 layers x (attention + 4 experts + shared expert)
    assert plan.collective_counts() == {"all_reduce": 12}
