"""Unit tests of the plan API (``xtp.plan``) and of shard()'s checks, in one process.

Plans are built from configs on the meta device (no weights). shard() runs at tp 1 (a single
process is a TP group of one), or with a fake TPContext saying "rank 0 of 2" where the test only
needs the model to be changed, never a collective (tests/thread_ranks.py).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

import xtp
from conftest import requires_transformers5
from parity_cases import CASES, V
from thread_ranks import (
    Meeting,
    ThreadCommunicator,
    fake_context,
    group_checks_recorded,
    rel_err,
    run_sharded,
)
from xtp.errors import AlreadyShardedError, RuleError, TPSizeError, UnclassifiedModuleError
from xtp.models.build import meta_model
from xtp.planning.spec import SHARDED_ROLES, Role

CASE = {c.id: c for c in CASES}


def config_of(case_id: str, **overrides):
    case = CASE[case_id]
    return transformers.CONFIG_MAPPING[case.model_type](**{**case.kwargs, **overrides})


@pytest.fixture(scope="module")
def llama_config():
    return config_of("llama")  # 12 heads, 12 KV heads, 2 layers, hidden 96, vocab 101


@pytest.fixture(scope="module")
def llama_plan(llama_config):
    return xtp.plan(llama_config, 2)


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config_of("llama")).eval()


def raised(exc_type, fn, *args, **kwargs):
    """The exception ``fn`` raises, checked to be exactly ``exc_type``."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert type(info.value) is exc_type, f"{type(info.value).__name__} is not {exc_type.__name__}"
    return info.value


# -- roles, collectives, bytes -------------------------------------------------------------------


def test_llama_roles(llama_plan):
    roles = {}
    for layer in range(2):
        p = f"model.layers.{layer}."
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "mlp.gate_proj", "mlp.up_proj"):
            roles[p + leaf] = Role.COLUMN
        roles[p + "self_attn.o_proj"] = Role.ROW
        roles[p + "mlp.down_proj"] = Role.ROW
    roles["model.embed_tokens"] = Role.VOCAB_EMBEDDING
    roles["lm_head"] = Role.LM_HEAD
    for name, role in roles.items():
        spec = llama_plan.spec(name)
        assert spec is not None, name
        assert spec.role == role, (name, spec.role, spec.reason)
        assert spec.reason
    assert {s.name for s in llama_plan.sharded()} == set(roles)
    # a column layer and the row it feeds share one partition of the inner dimension
    for s in llama_plan.specs:
        if s.role == Role.COLUMN and s.layout is None and s.name.endswith(("q_proj", "up_proj")):
            row = llama_plan.spec(s.group)
            assert row.role == Role.ROW and row.ranges == s.ranges


def test_llama_per_rank_extents(llama_plan):
    assert [llama_plan.spec("model.layers.0.self_attn.q_proj").local_extent(r)
            for r in range(2)] == [48, 48]
    assert [llama_plan.spec("model.embed_tokens").local_extent(r) for r in range(2)] == [51, 50]
    assert {u.attr for u in llama_plan.attr_updates} <= {"num_heads", "num_key_value_heads"}


def test_collective_counts(llama_config, llama_plan):
    layers = llama_config.num_hidden_layers
    assert llama_plan.collective_counts() == {"all_reduce": 2 * layers + 1, "all_gather": 1}
    assert xtp.plan(llama_config, 1).collective_counts() == {}


def _model_bytes(model: nn.Module) -> int:
    params = {id(p): p for p in model.parameters()}.values()
    return sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])


def test_bytes_per_rank_adds_up(llama_config, llama_plan):
    model = meta_model(llama_config)
    total = _model_bytes(model)
    modules = dict(model.named_modules())
    sharded = sum(p.numel() * p.element_size() for s in llama_plan.sharded()
                  for p in modules[s.name].parameters(recurse=False))
    replicated = total - sharded
    per_rank = [llama_plan.bytes_per_rank(r) for r in range(2)]
    # every sharded row is on exactly one rank (12 KV heads: nothing replicated), so the
    # ranks together hold the model once plus one more copy of everything replicated
    assert sum(per_rank) == total + replicated
    # roughly half each: the MLP's 120 features split in units of 8 (64 / 56) tilt it a little
    for b in per_rank:
        assert abs(b - (sharded / 2 + replicated)) <= 0.03 * total
    assert xtp.plan(llama_config, 1).bytes_per_rank(0) == total


def test_str_collapses_layers_and_shows_sizes():
    plan = xtp.plan(config_of("llama_6heads_tp4"), 4)  # 6 heads of 16 over 4 ranks
    text = str(plan)
    assert text.startswith("ShardPlan: tp_size=4, model_type=llama, heads=6, kv_heads=6, "
                           "head_dim=16")
    assert "model.layers.*.self_attn.q_proj" in text
    assert "model.layers.0." not in text
    q_row = next(line for line in text.splitlines() if "self_attn.q_proj" in line)
    assert "column" in q_row and "32/32/16/16" in q_row
    assert re.search(r"model\.layers\.\*\.self_attn\.q_proj\s+2\s", text), "count column"
    assert "bytes per rank: rank 0: " in text and "rank 3: " in text
    assert "collectives per forward: 1 x all_gather, 5 x all_reduce" in text


def test_to_dict_is_json(llama_plan):
    d = json.loads(json.dumps(llama_plan.to_dict()))
    assert d["tp_size"] == 2 and d["model_type"] == "llama"
    assert d["head_shape"] == [12, 12, 8]
    assert len(d["modules"]) == len(llama_plan.specs)
    q = next(m for m in d["modules"] if m["name"] == "model.layers.0.self_attn.q_proj")
    assert q["role"] == Role.COLUMN and q["local_extent"] == [48, 48]
    assert d["bytes_per_rank"] == [llama_plan.bytes_per_rank(r) for r in range(2)]
    assert d["collectives_per_forward"] == {"all_reduce": 5, "all_gather": 1}


def test_plan_is_immutable_and_per_model(llama_config, llama_plan):
    with pytest.raises(dataclasses.FrozenInstanceError):
        llama_plan.tp_size = 4
    other = xtp.plan(config_of("gpt2"), 2)
    assert llama_plan.spec("transformer.h.0.attn.c_attn") is None
    assert other.spec("model.layers.0.self_attn.q_proj") is None
    assert xtp.plan(llama_config, 2) == llama_plan  # deterministic


def test_plan_70b_shape_on_meta():
    config = transformers.LlamaConfig(
        hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=28672, vocab_size=128256, dtype=torch.bfloat16)
    plan = xtp.plan(config, 8)
    params = (128256 * 8192 * 2  # embeddings and untied LM head
              + 80 * (8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672 + 2 * 8192) + 8192)
    assert 70e9 < params < 71e9
    per_rank = [plan.bytes_per_rank(r) for r in range(8)]
    assert len(set(per_rank)) == 1
    assert abs(per_rank[0] - params * 2 / 8) < 0.01 * params * 2 / 8  # ~17.6 GB of 141 GB
    assert plan.collective_counts() == {"all_reduce": 161, "all_gather": 1}
    assert plan.spec("model.layers.79.self_attn.k_proj").local_extent(7) == 128  # 1 KV head


@requires_transformers5
def test_olmo2_differences_with_transformers_tp_plan():
    plan = xtp.plan(config_of("olmo2"), 2)
    diffs = plan.tp_plan_differences
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        line = next((d for d in diffs if f"model.layers.*.self_attn.{proj}:" in d), None)
        assert line is not None, f"{proj} not reported: {diffs}"
        assert "transformers says" in line and f"xtp chose {Role.REPLICATE}" in line
        # q_norm (a per-token norm over the whole q_proj width) could split with the pair
        # (tests/planning/test_inner_norms.py); k_norm over the KV width keeps it whole
        assert "k_norm has a parameter of shape" in line
    assert plan.spec("model.layers.0.self_attn.q_proj").role == Role.REPLICATE
    assert plan.spec("model.layers.0.mlp.down_proj").role == Role.ROW
    assert plan.collective_counts() == {"all_reduce": 3, "all_gather": 1}
    assert "differs from transformers' tp_plan: model.layers.*.self_attn.q_proj" in str(plan)
    assert any("k_norm" in n for n in plan.notes)


def test_llama_agrees_with_transformers_tp_plan(llama_plan):
    assert llama_plan.tp_plan_differences == ()


# -- every column feeds a row -------------------------------------------------------------------


def _column_partners(plan) -> dict[str, str]:
    """Column layer -> role of the row layer it feeds (must be Role.ROW)."""
    return {s.name: plan.spec(s.group).role for s in plan.specs if s.role == Role.COLUMN}


@requires_transformers5
@pytest.mark.parametrize("case_id", ["llama", "gpt2", "opt", "t5", "bert"])
def test_every_column_feeds_a_row(case_id):
    partners = _column_partners(xtp.plan(config_of(case_id), 2))
    assert partners and set(partners.values()) == {Role.ROW}


# OPT with word_embed_proj_dim != hidden_size (opt-350m: 512 vs 1024) has project_out
# (hidden -> 48) feeding lm_head (48 -> vocab), whose weight is tied to embed_tokens. The
# planner pairs project_out (column) with lm_head (row), then _check_ties finds the tied
# embed_tokens (vocab_embedding) and lm_head (row) split differently and sets both to
# replicate, but leaves project_out a column: rank r's project_out emits 24 features into a
# whole lm_head that wants 48 ("mat1 and mat2 shapes cannot be multiplied (14x24 and 48x101)").
OPT_350M_LIKE = dict(word_embed_proj_dim=48)


@requires_transformers5
def test_every_column_feeds_a_row_opt_projected_embeddings():
    partners = _column_partners(xtp.plan(config_of("opt", **OPT_350M_LIKE), 2))
    assert set(partners.values()) == {Role.ROW}, partners


@requires_transformers5
def test_opt_projected_embeddings_numerically():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config_of("opt", **OPT_350M_LIKE)).eval()
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    for out in run_sharded(model, 2, lambda m: m(ids).logits):
        assert rel_err(out, want) <= 1e-5


# -- rules -----------------------------------------------------------------------------------------


def test_rule_unknown_role(llama_config):
    err = raised(RuleError, xtp.plan, llama_config, 2, rules={"*.mlp.*": "column"})
    assert "'column'" in str(err) and "replicate" in str(err)


def test_rule_matching_nothing(llama_config):
    err = raised(RuleError, xtp.plan, llama_config, 2, rules={"*.feed_forward.*": "replicate"})
    msg = str(err)
    assert "'*.feed_forward.*'" in msg and "matches no module" in msg
    assert "model.layers.*.mlp" in msg, "the message should show module paths to match"


def test_rule_replicates_mlps(llama_config):
    plan = xtp.plan(llama_config, 2, rules={"*.mlp.*": "replicate"})
    for layer in range(2):
        for leaf in ("gate_proj", "up_proj", "down_proj"):
            spec = plan.spec(f"model.layers.{layer}.mlp.{leaf}")
            assert spec.role == Role.REPLICATE and "*.mlp.*" in spec.reason
        assert plan.spec(f"model.layers.{layer}.self_attn.o_proj").role == Role.ROW
    assert plan.collective_counts() == {"all_reduce": 2 + 1, "all_gather": 1}


def test_rule_on_one_partner_keeps_the_pair_whole(llama_config):
    plan = xtp.plan(llama_config, 2, rules={"model.layers.0.mlp.down_proj": "replicate"})
    assert plan.spec("model.layers.0.mlp.gate_proj").role == Role.REPLICATE
    assert plan.spec("model.layers.0.mlp.up_proj").role == Role.REPLICATE
    assert plan.spec("model.layers.1.mlp.down_proj").role == Role.ROW


# -- errors ----------------------------------------------------------------------------------------


def test_tp_larger_than_heads(llama_config):
    err = raised(TPSizeError, xtp.plan, llama_config, 16)
    assert "12" in str(err)
    assert "Sizes that work: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]" in str(err)


def test_gqa_tp_not_a_multiple_of_kv_heads_replicates_kv():
    # refused before issue 17 ("Sizes that work: [1, 2, 3, 4, 5, 6, 12]"): now KV heads 0 and
    # 1 sit on two ranks each, which split their query heads (12 heads, 6 KV heads, tp 8)
    plan = xtp.plan(config_of("mistral"), 8)
    k = plan.spec("model.layers.0.self_attn.k_proj")
    q = plan.spec("model.layers.0.self_attn.q_proj")
    D = plan.head_shape[2]
    assert [k.local_extent(r) for r in range(8)] == [D] * 8
    assert [q.local_extent(r) for r in range(8)] == [D] * 4 + [2 * D] * 4
    assert any("replicated" in n for n in plan.notes)


class _FusedAttention(nn.Module):
    """One Linear whose output is split into three *unequal* parts (16 | 8 | 8) that feed one
    row layer: a fused layer of a layout xtp cannot know."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 32)
        self.o = nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).split([16, 8, 8], dim=-1)
        return self.o(q * torch.cat([k, k], -1) + torch.cat([v, v], -1))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _FusedAttention()

    def forward(self, x):
        return x + self.attn(x)


class _CustomModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=4, hidden_size=16, vocab_size=32)
        self.embed = nn.Embedding(32, 16)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_unclassified_fused_layer_suggests_a_rule():
    with torch.device("meta"):
        model = _CustomModel()
    err = raised(UnclassifiedModuleError, xtp.plan, model, 2)
    msg = str(err)
    assert "layers.*.attn.qkv" in msg and "32 output features" in msg
    assert "matches no fused layout xtp can split" in msg
    found = re.search(r"rules=(\{[^}]*\})", msg)
    assert found, f"no rule in: {msg}"
    rules = ast.literal_eval(found.group(1))
    plan = xtp.plan(model, 2, rules=rules)  # the suggested rule works as given
    assert plan.spec("layers.0.attn.qkv").role == Role.REPLICATE
    assert plan.spec("layers.1.attn.o").role == Role.REPLICATE
    assert plan.spec("embed").role == Role.VOCAB_EMBEDDING


# -- shard(): already sharded, failures leave the model as it was ---------------------------


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_shard_twice_raises_already_sharded():
    model = tiny_llama()
    assert xtp.shard(model) is model
    plan = getattr(model, "_xtp_plan", None)
    assert plan is not None and plan.tp_size == 1, "shard() at tp 1 must mark the model"
    err = raised(AlreadyShardedError, xtp.shard, model)
    assert "already sharded" in str(err)


def test_failed_shard_bad_rule_leaves_model_unchanged():
    model = tiny_llama()
    before = _snapshot(model)
    raised(RuleError, xtp.shard, model, rules={"nothing.*": "replicate"})
    assert _same(before, _snapshot(model))
    assert getattr(model, "_xtp_plan", None) is None
    xtp.shard(model)  # not marked as sharded: a second attempt works


def _gpt2():
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config_of("gpt2")).eval()


def _fail_while_moving(model, monkeypatch) -> None:
    """shard() as rank 0 of 2, failing at its last step (moving the model to the device)."""

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(model, "to", out_of_memory)
    ctx = fake_context(2, 0, ThreadCommunicator(Meeting(2), 0))
    with group_checks_recorded(), pytest.raises(RuntimeError, match="simulated"):
        xtp.shard(model, context=ctx)
    monkeypatch.undo()


def test_failed_shard_restores_parameters_and_classes(monkeypatch):
    model = _gpt2()
    before = _snapshot(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    _fail_while_moving(model, monkeypatch)
    assert _same(before, _snapshot(model))
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert getattr(model, "_xtp_plan", None) is None


# shard() rolls back only the modules whose parameters it replaced (the saved list in
# xtp/shard.py covers `changes`); the plan's attr_updates (GPT-2 attention num_heads 12 -> 6,
# split_size and embed_dim 96 -> 48), head-slicing hooks (Bloom) and private local configs
# (Phi-3) are applied to *other* modules (the attention parents) and stay applied when a later
# step fails: the "unchanged" model then crashes in forward ("too many values to unpack").
def test_failed_shard_restores_attention_attributes(monkeypatch):
    model = _gpt2()
    attn = model.transformer.h[0].attn
    attrs = {a: getattr(attn, a) for a in ("num_heads", "split_size", "embed_dim")}
    ids = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    _fail_while_moving(model, monkeypatch)
    assert {a: getattr(attn, a) for a in attrs} == attrs
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_spec_ranges_per_role(llama_plan):
    for s in llama_plan.specs:
        if s.role in SHARDED_ROLES:
            assert len(s.ranges) == 2 and s.nbytes and len(s.nbytes) == 2
        else:
            assert s.ranges == ()
