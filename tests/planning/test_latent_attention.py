"""Multi-head latent attention (DeepSeek-V2/V3): the per-head up-projections and the output
projection are split by heads, each at its own head width as the forward views it; the shared
low-rank down-projections and their norms stay whole (issue 17).

Tier: plans (meta models, no ranks) and one in-process thread-rank check; the numbers over
real gloo ranks are the parity suite's ``deepseek_v2`` (tp 2/3/4) and ``deepseek_v3_no_q_lora``
(tp 3) cases.
"""

from __future__ import annotations

import torch
import transformers

import xtp
from parity_cases import _MLA, CASES
from thread_ranks import rel_err, run_sharded

TP = 3


def _plan(case_id: str):
    case = next(c for c in CASES if c.id == case_id)
    return xtp.plan(case.config(), TP)


def test_up_projections_split_by_heads_at_their_own_width():
    plan = _plan("deepseek_v2")
    attn = "model.layers.0.self_attn."
    # 4 heads over 3 ranks: 2, 1, 1; q heads 8 + 4 = 12 wide, kv_b heads 8 + 8 = 16, o_proj 8
    assert plan.spec(attn + "q_b_proj").ranges == (((0, 24),), ((24, 36),), ((36, 48),))
    assert plan.spec(attn + "kv_b_proj").ranges == (((0, 32),), ((32, 48),), ((48, 64),))
    assert plan.spec(attn + "o_proj").ranges == (((0, 16),), ((16, 24),), ((24, 32),))
    for name in ("q_a_proj", "kv_a_proj_with_mqa"):
        assert not plan.spec(attn + name).is_sharded, name
    # the latent width (20) and head widths are left alone, and so is num_heads: the forward
    # views into heads by -1 and never reads it
    assert [u for u in plan.attr_updates if u.module == attn[:-1]] == []


def test_without_q_lora_the_query_projection_is_split_by_heads():
    plan = _plan("deepseek_v3_no_q_lora")
    q = plan.spec("model.layers.0.self_attn.q_proj")
    assert [q.local_extent(r) for r in range(TP)] == [24, 12, 12]



def test_row_as_wide_as_the_config_heads_with_wider_up_projections():
    """v_head_dim == the config's head size (8): o_proj is num_heads x head_dim wide as for
    plain attention, but q_b_proj (4 x 12) and kv_b_proj (4 x 16) match neither the heads nor
    a fused layout; the forward's views into 4 heads give their widths. Numbers at tp 3."""
    config = transformers.CONFIG_MAPPING["deepseek_v2"](**dict(_MLA, head_dim=8,
                                                               num_hidden_layers=1))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    plan = xtp.plan(model, TP)
    attn = "model.layers.0.self_attn."
    assert [plan.spec(attn + "q_b_proj").local_extent(r) for r in range(TP)] == [24, 12, 12]
    assert [plan.spec(attn + "kv_b_proj").local_extent(r) for r in range(TP)] == [32, 16, 16]
    ids = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    outs = run_sharded(model, TP, lambda m: m(ids).logits, plan=plan)
    assert max(rel_err(o, want) for o in outs) <= 1e-5
