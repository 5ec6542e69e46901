"""Parity suite: sharded vs unsharded on real gloo ranks (fp32, tiny random configs)."""

from __future__ import annotations

import pytest
import transformers

from parity_cases import CASES
from parity_worker import parity

#: cases whose forward issues more or fewer collectives than 2 per block, and why
EXTRA_COLLECTIVES = {
    "qwen2_moe": "the shared expert MLP adds its own all-reduce (3 per block)",
    "deepseek_v2": "the MoE block's routed and shared experts add one all-reduce each",
    "deepseek_v3_no_q_lora": "the MoE block's routed and shared experts add one all-reduce each",
    "olmo2": "attention kept whole: q_norm/k_norm normalise over all heads (1 per block)",
}
if transformers.__version__.startswith("4."):
    EXTRA_COLLECTIVES["mixtral"] = ("transformers 4.x keeps each expert as its own MLP: one "
                                    "all-reduce per routed expert")

#: cases the newest transformers 4.x cannot shard: its forward uses a head count xtp does not
#: make local (codegen 4.x: num_attention_heads // mp_num), so shard() refuses before touching
#: the model (ShardedForwardError) instead of running or answering wrong
REFUSED = {"codegen": "the forward of CodeGenForCausalLM cannot run sharded this way"} \
    if transformers.__version__.startswith("4.") else {}

PARAMS = [pytest.param(c.id, tp, id=f"{c.id}-tp{tp}") for c in CASES for tp in c.tps
          if c.id not in REFUSED]


@pytest.mark.distributed
@pytest.mark.parametrize("case_id,tp", PARAMS)
def test_sharded_matches_unsharded(rank_pool, case_id, tp):
    results = rank_pool(tp).run(parity, case_id, tp)
    for rank, r in enumerate(results):
        assert r["rel_err"] <= 1e-5, f"rank {rank}: relative error {r['rel_err']:.2e}"
        assert r["tokens_equal"], f"rank {rank}: greedy tokens differ"
        if "counts" in r:
            assert r["counts"] == r["plan_counts"], "collectives differ from the plan's forecast"
            if case_id not in EXTRA_COLLECTIVES:
                # two all-reduces per block + one for the vocab embedding; one gather of logits
                assert r["counts"] == {"all_reduce": 2 * r["layers"] + 1, "all_gather": 1}


@pytest.mark.distributed
@pytest.mark.parametrize("case_id", sorted(REFUSED))
def test_refused_with_the_reason_where_the_forward_cannot_run_sharded(rank_pool, case_id):
    with pytest.raises(Exception, match=f"ShardedForwardError: {REFUSED[case_id]}"):
        rank_pool(2).run(parity, case_id, 2)


# -- plain PyTorch models (no transformers, no config): issue 17 ---------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["nanogpt", "scratch_llama", "scratch_moe", "scratch_sinks"])
@pytest.mark.parametrize("tp", [2, 3])
def test_plain_pytorch_model_matches_unsharded(rank_pool, name, tp):
    """Head counts from the forward's views into heads; fused c_attn's layout from its split;
    scratch_moe: experts as a ModuleList of Linear MLPs and a shared expert, each expert split
    as its own MLP pair, in a block whose attention and MoE run in parallel; scratch_sinks:
    per-head sinks and gate biases, per-feature query bias, MLP scale and logit scale, each
    sliced with its heads or features (uneven heads and replicated KV heads at tp 3)."""
    from parity_worker import scratch_parity

    for rank, r in enumerate(rank_pool(tp).run(scratch_parity, name, tp)):
        assert r["rel_err"] <= 1e-5, f"rank {rank}: relative error {r['rel_err']:.2e}"
        assert r["tokens_equal"], f"rank {rank}: greedy tokens differ"
        assert r["share"] < 0.8, f"rank {rank} holds {r['share']:.2f} of the weights"


@pytest.mark.distributed
def test_explicit_heads_when_the_forward_does_not_show_them(rank_pool):
    """q is scaled before its view into heads: the forward shows only the KV heads, so the
    head counts are passed explicitly (xtp.shard(model, heads=6, kv_heads=2))."""
    from parity_worker import scratch_parity

    results = rank_pool(3).run(scratch_parity, "scratch_llama_prescaled", 3, 6, 2)
    for rank, r in enumerate(results):
        assert r["rel_err"] <= 1e-5, f"rank {rank}: relative error {r['rel_err']:.2e}"
        assert r["tokens_equal"], f"rank {rank}: greedy tokens differ"


@pytest.mark.distributed
def test_embedding_used_outside_its_lookup_kept_whole(rank_pool):
    """The logits are the hidden states times the input embedding's weight, in the model's own
    forward: the embedding stays whole, so every rank's logits cover the whole vocabulary."""
    from parity_worker import scratch_parity

    for rank, r in enumerate(rank_pool(2).run(scratch_parity, "scratch_shared_logits", 2)):
        assert r["rel_err"] <= 1e-5, f"rank {rank}: relative error {r['rel_err']:.2e}"
        assert r["tokens_equal"], f"rank {rank}: greedy tokens differ"
        assert r["share"] < 0.8, f"rank {rank} holds {r['share']:.2f} of the weights"
