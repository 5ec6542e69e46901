"""One test per entry of xtp.planning.model_table, the only model-specific knowledge xtp has.

Tiers: plans are built on the meta device (no weights); numeric checks run the sharded model
in one process with thread-ranks (tests/helpers/thread_ranks.py, fp32, relative error <= 1e-5
against the unsharded model). The real-process proof per architecture is
tests/sharding/test_parity.py.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

import xtp
from conftest import requires_transformers5
from parity_cases import CASES, V
from thread_ranks import rel_err, run_sharded
from xtp.models.build import meta_model
from xtp.planning import model_table as mt
from xtp.planning.spec import Layout, Role
from xtp.sharding.hooks import head_slicing_hook

TOL = 1e-5
CASE = {c.id: c for c in CASES}
C = transformers.CONFIG_MAPPING


def case_config(case_id: str, **overrides):
    case = CASE[case_id]
    return C[case.model_type](**{**case.kwargs, **overrides})


#: configs by name: the parity cases plus variants the parity suite does not run
CONFIGS = {
    "phi3": lambda: case_config("phi3"),
    "gpt2": lambda: case_config("gpt2"),
    "gptj": lambda: case_config("gptj"),
    "gpt_bigcode": lambda: case_config("gpt_bigcode"),
    "gpt_bigcode_mha": lambda: case_config("gpt_bigcode", multi_query=False),
    "gpt_neox": lambda: case_config("gpt_neox"),
    "bloom": lambda: case_config("bloom"),
    "falcon_grouped_kv2": lambda: case_config("falcon", num_kv_heads=2),
    "falcon_mqa": lambda: case_config("falcon_mqa"),
    "falcon_mha": lambda: C["falcon"](hidden_size=96, num_attention_heads=12,
                                      num_hidden_layers=2, vocab_size=V, multi_query=False,
                                      new_decoder_architecture=False, alibi=False),
    "falcon_alibi": lambda: C["falcon"](hidden_size=96, num_attention_heads=12,
                                        num_hidden_layers=2, vocab_size=V, multi_query=False,
                                        new_decoder_architecture=False, alibi=True),
    "llama_kv1": lambda: case_config("llama_kv1"),
    "stablelm": lambda: case_config("stablelm"),
    "t5": lambda: case_config("t5"),
    "bert": lambda: case_config("bert"),
    "openai": lambda: C["openai-gpt"](n_embd=96, n_head=12, n_layer=2, vocab_size=V,
                                      n_positions=64),
    "mixtral": lambda: case_config("mixtral"),
    "qwen2_moe": lambda: case_config("qwen2_moe"),
    "llama": lambda: case_config("llama"),
}


@functools.cache
def plan_of(name: str, tp: int):
    return xtp.plan(CONFIGS[name](), tp)


@functools.cache
def meta_of(name: str) -> nn.Module:
    return meta_model(CONFIGS[name]())


@functools.cache
def sharded_rel_err(name: str, tp: int) -> float:
    """Worst relative error of the logits over ``tp`` thread-ranks vs the unsharded model."""
    torch.manual_seed(0)
    config = CONFIGS[name]()
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    outs = run_sharded(model, tp, lambda m: m(ids).logits)
    return max(rel_err(o, want) for o in outs)


def leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


# -- fused layouts, inferred from the forward (FUSED_LAYOUTS is gone: issue 17) --------------

#: (model_type, layer leaf, layout the forward shows) -> config name; these were the entries of
#: the former FUSED_LAYOUTS table, now found by xtp.planning.fused.infer_layout
FUSED_CASES = {
    ("phi3", "qkv_proj", Layout.QKV_CONCAT): "phi3",
    ("phi3", "gate_up_proj", Layout.GATE_UP_CONCAT): "phi3",
    ("gpt2", "c_attn", Layout.QKV_CONCAT): "gpt2",
    ("gpt_bigcode", "c_attn", Layout.QKV_CONCAT): "gpt_bigcode",
    ("gpt_bigcode", "c_attn", Layout.QKV_INTERLEAVED): "gpt_bigcode_mha",
    ("gpt_neox", "query_key_value", Layout.QKV_INTERLEAVED): "gpt_neox",
    ("bloom", "query_key_value", Layout.QKV_INTERLEAVED): "bloom",
    ("falcon", "query_key_value", Layout.QKV_GROUPED): "falcon_grouped_kv2",
    ("falcon", "query_key_value", Layout.QKV_CONCAT): "falcon_mqa",
    ("falcon", "query_key_value", Layout.QKV_INTERLEAVED): "falcon_mha",
}
#: numeric checks of the variants the parity suite does not run (it runs every other entry's
#: architecture at tp 2, 3 and 4 in real processes): config name -> tp
FUSED_NUMERIC = {
    "falcon_grouped_kv2": 4,  # qkv_grouped with KV heads replicated (2 KV heads, 4 ranks)
    "falcon_mha": 2,          # falcon's default-architecture qkv_interleaved
}


def test_no_fused_layout_table():
    assert not hasattr(mt, "FUSED_LAYOUTS") and not hasattr(mt, "fused_layout")


@pytest.mark.parametrize("key", list(FUSED_CASES), ids=lambda k: "-".join(k))
def test_fused_layer_planned_as_column_with_its_inferred_layout(key):
    model_type, layer, layout = key
    name = FUSED_CASES[key]
    config = CONFIGS[name]()
    assert config.model_type == model_type
    plan = plan_of(name, 2)
    specs = [s for s in plan.specs if leaf(s.name) == layer]
    assert specs, f"no {layer} in the {name} model"
    for s in specs:
        assert (s.role, s.layout) == (Role.COLUMN, layout), s
        assert plan.spec(s.group).role == Role.ROW, f"{s.name} feeds {s.group}, which is not a row"


@pytest.mark.parametrize("name,tp", list(FUSED_NUMERIC.items()))
def test_fused_variant_numerically(name, tp):
    assert sharded_rel_err(name, tp) <= TOL


@pytest.mark.parametrize("flags,layout", [
    (dict(new_decoder_architecture=True, multi_query=True, num_kv_heads=2), Layout.QKV_GROUPED),
    (dict(new_decoder_architecture=True, multi_query=False, num_kv_heads=4), Layout.QKV_GROUPED),
    (dict(new_decoder_architecture=False, multi_query=True), Layout.QKV_CONCAT),
    (dict(new_decoder_architecture=False, multi_query=False), Layout.QKV_INTERLEAVED),
])
def test_falcon_variants_from_the_forward(flags, layout):
    config = C["falcon"](hidden_size=96, num_attention_heads=12, num_hidden_layers=1,
                         vocab_size=V, alibi=False, **flags)
    specs = [s for s in xtp.plan(config, 2).specs if leaf(s.name) == "query_key_value"]
    assert specs and {s.layout for s in specs} == {layout}


# GPT-BigCode with multi_query=False (e.g. the "santacoder-mha" style configs) stores c_attn per
# head as [q, k, v] (its forward does .view(..., num_heads, 3 * head_dim).split(head_dim)): that
# is QKV_INTERLEAVED. (H + 2K) * D == 3 * H * D when K == H, so a width check alone would accept
# QKV_CONCAT and compute wrong attention, silently (relative error ~0.6 at tp 2).
def test_gpt_bigcode_multi_head_c_attn_layout():
    assert {s.layout for s in plan_of("gpt_bigcode_mha", 2).specs
            if leaf(s.name) == "c_attn"} == {Layout.QKV_INTERLEAVED}


def test_gpt_bigcode_multi_head_numerically():
    assert sharded_rel_err("gpt_bigcode_mha", 2) <= TOL


# -- head attributes, found from the forward (HEAD_ATTRIBUTES is gone: issue 17) -------------

#: (config name, attention class, attribute, full value, tp, local values or None when the
#: plan leaves it: the model's forward does not use it as a head count or width)
HEAD_ATTR_CASES = [
    ("gpt2", "GPT2Attention", "split_size", 96, 2, (48, 48)),    # qkv.split(self.split_size)
    ("gpt2", "GPT2Attention", "num_heads", 12, 2, None),         # views by -1: unused
    ("gpt2", "GPT2Attention", "embed_dim", 96, 2, None),
    ("bloom", "BloomAttention", "num_heads", 12, 2, (6, 6)),     # view(b, s, num_heads, 3, d)
    ("bloom", "BloomAttention", "hidden_size", 96, 2, None),
    ("falcon_grouped_kv2", "FalconAttention", "num_kv_heads", 2, 4, (1, 1, 1, 1)),
    ("gpt_bigcode", "GPTBigCodeAttention", "embed_dim", 96, 2, (48, 48)),  # split((q, kv, kv))
    ("gpt_bigcode_mha", "GPTBigCodeAttention", "num_heads", 12, 2, (6, 6)),
    ("llama_kv1", "LlamaAttention", "num_key_value_groups", 12, 2, (6, 6)),  # repeat_kv
    ("t5", "T5Attention", "inner_dim", 96, 3, None),             # views by -1: unused
]


def test_head_count_read_by_a_tensor_factory():
    """T5's attention without a relative bias makes a zero bias ``torch.zeros((1, n_heads, q,
    k))`` that meets the scores: n_heads is a count there. Only the first cross-attention
    builds it (later layers receive the bias), so only it reads n_heads and gets its local
    value (tests/sharding/test_parity.py runs t5 sharded against the unsharded model)."""
    updates = [(u.module, u.attr, u.values) for u in plan_of("t5", 2).attr_updates]
    factory_read = ("decoder.block.0.layer.1.EncDecAttention", "n_heads", (6, 6))
    assert factory_read in updates
    if transformers.__version__.startswith("5."):  # 4.x also views every head by n_heads
        assert updates == [factory_read]


@requires_transformers5
@pytest.mark.parametrize("name,cls,attr,full,tp,local", HEAD_ATTR_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in HEAD_ATTR_CASES])
def test_head_attribute_on_real_attention(name, cls, attr, full, tp, local):
    mods = {n: m for n, m in meta_of(name).named_modules() if type(m).__name__ == cls}
    assert mods, f"no {cls} in {name}"
    for m in mods.values():
        assert m.__dict__.get(attr) == full, f"{cls}.{attr}"
    updates = {u.module: u for u in plan_of(name, tp).attr_updates if u.attr == attr}
    if local is None:
        assert updates == {}
        return
    assert set(updates) == set(mods), f"{attr} updated on {sorted(updates)}, want {sorted(mods)}"
    for u in updates.values():
        assert (u.full, u.values) == (full, local)


def test_no_head_attribute_table():
    assert not hasattr(mt, "HEAD_ATTRIBUTES")


def test_head_attributes_only_on_attention_modules():
    """gpt2's GPT2Model also has embed_dim == 96: only the attention modules change."""
    plan = plan_of("gpt2", 2)
    assert {u.module.rsplit(".", 1)[-1] for u in plan.attr_updates} == {"attn"}


@pytest.mark.parametrize("tp", [2, 3])
def test_openai_gpt_fused_c_attn_from_the_forward(tp):
    """openai-gpt's c_attn was refused while layouts came from a table (no entry for it; this
    test asserted that refusal before issue 17): its forward's split + view into heads now
    shows QKV_CONCAT, and the sharded model matches the unsharded one."""
    specs = [s for s in plan_of("openai", tp).specs if leaf(s.name) == "c_attn"]
    assert specs and {(s.role, s.layout) for s in specs} == {(Role.COLUMN, Layout.QKV_CONCAT)}
    assert sharded_rel_err("openai", tp) <= TOL


class _RoleAttention(nn.Module):
    """Grouped-query attention using int attributes whose names mean nothing to xtp, each in
    one role: ``qa``/``kb`` head counts of views, ``rep`` the KV repeat factor (by ``expand``
    and by ``repeat_interleave``), ``wid`` the merged width, ``hd`` the head width (last size
    of every view: never a count, even when equal to the head count), ``spare`` equal to the
    head count but never used."""

    def __init__(self, heads: int, kv: int, head_dim: int) -> None:
        super().__init__()
        hidden = heads * head_dim
        self.q = nn.Linear(hidden, heads * head_dim)
        self.k = nn.Linear(hidden, kv * head_dim)
        self.v = nn.Linear(hidden, kv * head_dim)
        self.o = nn.Linear(heads * head_dim, hidden)
        self.qa, self.kb, self.rep, self.wid = heads, kv, heads // kv, hidden
        self.hd, self.spare = head_dim, heads

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.qa, self.hd)
        k = self.k(x).view(b, s, self.kb, self.hd)[:, :, :, None]
        k = k.expand(b, s, self.kb, self.rep, self.hd).reshape(b, s, -1, self.hd)
        v = self.v(x).view(b, s, self.kb, self.hd).repeat_interleave(self.rep, dim=2)
        return self.o((q * k.sin() + v).reshape(b, s, self.wid))


class _TinyModel(nn.Module):
    def __init__(self, attn: nn.Module, config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.attn = attn
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return self.head(h + self.attn(h))


def _role_model(heads: int, kv: int, head_dim: int) -> _TinyModel:
    config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv,
                             head_dim=head_dim, hidden_size=heads * head_dim, vocab_size=16)
    torch.manual_seed(0)
    return _TinyModel(_RoleAttention(heads, kv, head_dim), config).eval()


@pytest.mark.parametrize("heads,kv,head_dim,tp,want", [
    # 4 query heads in 2 KV groups of 2 (repeat factor == KV heads: told apart by role), head
    # width 4 == query heads (the last size of a view: a width, never the count)
    (4, 2, 4, 2, {"qa": (2, 2), "kb": (1, 1), "wid": (8, 8)}),
    (4, 2, 4, 3, {"qa": (1, 1, 2), "kb": (1, 1, 1), "rep": (1, 1, 2), "wid": (4, 4, 8)}),
    (4, 1, 2, 2, {"qa": (2, 2), "rep": (2, 2), "wid": (4, 4)}),
    (6, 6, 2, 3, {"qa": (2, 2, 2), "kb": (2, 2, 2), "wid": (4, 4, 4)}),
])
def test_head_attributes_by_role_not_name(heads, kv, head_dim, tp, want):
    """Each attribute gets the rank's value of what the forward uses it as; the plan's
    shards match the unsharded model."""
    model = _role_model(heads, kv, head_dim)
    updates = {u.attr: u.values for u in xtp.plan(model, tp).attr_updates}
    assert updates == want
    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
        outs = run_sharded(model, tp, lambda m: m(ids))
    assert max(rel_err(o, ref) for o in outs) <= TOL


# -- local configs, found from the forward (LOCAL_CONFIG_MODEL_TYPES is gone: issue 17) --------


def test_local_config_model_types_entry():
    # phi3's attention slices qkv at self.config.num_attention_heads * head_dim: the probe sees
    # that config value reach the slice, so its attention modules get local configs
    assert not hasattr(mt, "LOCAL_CONFIG_MODEL_TYPES")
    plan = plan_of("phi3", 4)  # 12 heads in 6 KV groups over 4 ranks: 2, 2, 1, 1 groups
    attns = sorted(n for n, m in meta_of("phi3").named_modules()
                   if type(m).__name__ == "Phi3Attention")
    assert sorted(name for name, _ in plan.local_configs) == attns
    for _, values in plan.local_configs:
        assert dict(values) == {"num_attention_heads": (4, 4, 2, 2),
                                "num_key_value_heads": (2, 2, 1, 1)}


@pytest.mark.parametrize("name", ["llama", "gpt2", "falcon_mqa", "bloom"])
def test_no_local_config_elsewhere(name):
    assert plan_of(name, 2).local_configs == ()


def test_phi3_attention_gets_a_private_config():
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["phi3"]()).eval()

    def look(m):
        attn = m.model.layers[0].self_attn
        return (m.config.num_attention_heads, attn.config.num_attention_heads,
                attn.config.num_key_value_heads, attn.config is m.config)

    assert run_sharded(model, 2, look) == [(12, 6, 3, False)] * 2
    assert model.model.layers[0].self_attn.config is model.config  # the original is untouched


# -- per-head keyword inputs, found from the forward (HEAD_SLICED_KWARGS is gone: issue 17) ---


def test_no_head_sliced_kwargs_table():
    assert not hasattr(mt, "HEAD_SLICED_KWARGS")


def _falcon_alibi_inputs() -> set:
    """What Falcon's attention receives per head in this transformers: 4.x hands ALiBi over as
    ``alibi`` (batch * heads, 1, kv), 5.0-5.24 as (batch, heads, 1, kv), 5.25 on adds it to the
    (batch, heads, q, kv) mask and takes no ``alibi``: each version's forward shows its own."""
    import inspect

    from transformers.models.falcon import modeling_falcon
    want = {("attention_mask", "heads_dim1")}
    if "alibi" in inspect.signature(modeling_falcon.FalconAttention.forward).parameters:
        want.add(("alibi", "heads_dim1" if transformers.__version__.startswith("5.")
                  else "batch_x_heads"))
    return want


@pytest.mark.parametrize("name,want", [
    ("falcon_alibi", _falcon_alibi_inputs()),
    ("falcon_mha", set()),  # no ALiBi: the mask is shared by all heads, nothing to cut
    ("llama_kv1", set()),
    ("t5", set()),  # the position bias is made from the split bias table: already local
])
def test_per_head_keyword_inputs_found_from_the_forward(name, want):
    plan = plan_of(name, 2)
    assert {(kw, layout) for _, kw, layout, _, _ in plan.head_sliced_kwargs} == want


def test_bloom_alibi_entry_in_plan():
    plan = plan_of("bloom", 3)
    attns = sorted(n for n, m in meta_of("bloom").named_modules()
                   if type(m).__name__ == "BloomAttention")
    assert sorted(e[0] for e in plan.head_sliced_kwargs) == attns
    for _, kwarg, layout, heads, num_heads in plan.head_sliced_kwargs:
        assert (kwarg, layout, num_heads) == ("alibi", "batch_x_heads", 12)
        assert heads == ((0, 4), (4, 8), (8, 12))


def test_bloom_attention_receives_alibi_as_batch_x_heads_keyword():
    """The slicing hook only acts on a keyword argument whose first dimension is
    batch * num_heads; check transformers still calls BloomAttention that way."""
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["bloom"]()).eval()
    seen = []
    attn = model.transformer.h[0].self_attention
    handle = attn.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("alibi")), with_kwargs=True)
    try:
        with torch.no_grad():
            model(torch.zeros((2, 5), dtype=torch.long))
    finally:
        handle.remove()
    (alibi,) = seen
    assert alibi is not None and alibi.shape[0] == 2 * 12


def test_head_slicing_hook_keeps_this_ranks_heads():
    batch, heads = 2, 6
    t = torch.arange(batch * heads, dtype=torch.float32).reshape(batch * heads, 1, 1)
    hook = head_slicing_hook("alibi", "batch_x_heads", (2, 5), heads)
    _, kwargs = hook(None, (), {"alibi": t})
    want = [b * heads + h for b in range(batch) for h in range(2, 5)]
    assert kwargs["alibi"].flatten().tolist() == want
    assert hook(None, (), {"other": t}) is None


# Falcon with alibi=True (falcon-rw-1b / falcon-rw-7b) builds a per-head ALiBi bias in
# FalconModel and passes it to every layer: as `alibi`, reshaped to (batch, num_heads, 1, seq),
# and folded into a per-head `attention_mask` of shape (batch, num_heads, q, kv). Both must be
# cut to the rank's heads (found from the forward, test above), else forward fails at tp > 1
# with "The size of tensor a (6) must match the size of tensor b (12) at non-singleton
# dimension 1".
@pytest.mark.parametrize("name,tp", [("falcon_alibi", 2), ("falcon_alibi", 3), ("bloom", 3)])
def test_per_head_keyword_inputs_numerically(name, tp):
    assert sharded_rel_err(name, tp) <= TOL


# -- CONFIG_ALIASES / head_shape ----------------------------------------------------------------


@pytest.mark.parametrize("key,alias", [(k, a) for k, names in mt.CONFIG_ALIASES.items()
                                       for a in names])
def test_every_config_alias_is_read(key, alias):
    assert mt.config_value(SimpleNamespace(**{alias: 7}), key) == 7


@pytest.mark.parametrize("key", list(mt.CONFIG_ALIASES))
def test_first_alias_wins(key):
    names = mt.CONFIG_ALIASES[key]
    config = SimpleNamespace(**{n: i + 1 for i, n in enumerate(names)})
    assert mt.config_value(config, key) == 1
    assert mt.config_value(SimpleNamespace(), key) is None


@pytest.mark.parametrize("name,want", [
    ("gpt2", (12, 12, 8)),                # n_head, n_embd
    ("falcon_mqa", (12, 1, 8)),           # multi_query -> one KV head
    ("falcon_grouped_kv2", (12, 2, 8)),   # new_decoder_architecture: num_kv_heads
    ("llama_kv1", (12, 1, 8)),
])
def test_head_shape_from_real_configs(name, want):
    assert mt.head_shape(CONFIGS[name]()) == want


def test_head_shape_t5_d_kv():
    """T5's head size is d_kv, not d_model / num_heads."""
    config = case_config("t5", d_kv=16)
    assert mt.head_shape(config) == (12, 12, 16)


def test_head_shape_falcon_new_architecture_ignores_multi_query():
    config = case_config("falcon", multi_query=True, num_kv_heads=6)
    assert mt.head_shape(config) == (12, 6, 8)


def test_composite_config_sizes_come_from_its_text_config():
    """A vision-language config keeps heads and vocabulary in its text config; a config whose
    text config is ambiguous (the lookup raises) has none."""
    text = {"model_type": "llama", "num_attention_heads": 6, "num_key_value_heads": 2,
            "hidden_size": 48, "vocab_size": 99}
    config = transformers.LlavaConfig(text_config=text)
    assert mt.head_shape(config) == (6, 2, 8)
    assert mt.config_value(config, "vocab_size") == 99

    class Ambiguous(SimpleNamespace):
        def get_text_config(self):
            raise ValueError("multiple valid text configs")
    assert mt.config_value(Ambiguous(), "num_heads") is None


def test_head_shape_without_heads():
    assert mt.head_shape(None) is None
    assert mt.head_shape(SimpleNamespace(hidden_size=8)) is None
    assert mt.head_shape(SimpleNamespace(num_attention_heads=4)) is None  # no width at all


# -- EXPERTS / is_fused_experts ------------------------------------------------------------------


@requires_transformers5
@pytest.mark.parametrize("name,cls", [("mixtral", "MixtralExperts"),
                                      ("qwen2_moe", "Qwen2MoeExperts")])
def test_fused_experts_modules(name, cls):
    model = meta_of(name)
    found = {n for n, m in model.named_modules() if mt.is_fused_experts(m)}
    experts = {n for n, m in model.named_modules() if type(m).__name__ == cls}
    assert experts and found == experts
    e = mt.EXPERT_PARAMS
    plan = plan_of(name, 2)
    for n in experts:
        mod = dict(model.named_modules())[n]
        assert all(hasattr(mod, f) for f in e.flags)
        down = getattr(mod, e.down)
        gate_up = getattr(mod, e.gate_up if mod.has_gate else e.up)
        assert down.dim() == gate_up.dim() == 3
        inter = down.shape[1] if mod.is_transposed else down.shape[2]
        spec = plan.spec(n)
        assert spec.role == Role.EXPERTS and spec.full == inter
        assert sum(spec.local_extent(r) for r in range(2)) == inter
        for split in spec.param_splits():
            t = getattr(mod, split.param)
            covered = sum(b - a for rr in split.ranges for a, b in rr)
            assert covered == t.shape[split.dim] or split.zero_off_rank0, split
        if isinstance(mod.__dict__.get(e.intermediate_attr), int):
            (upd,) = [u for u in plan.attr_updates if u.module == n]
            assert upd.attr == e.intermediate_attr and sum(upd.values) == inter


@requires_transformers5
def test_not_fused_experts():
    model = meta_of("qwen2_moe")
    shared = model.model.layers[0].mlp.shared_expert
    assert not mt.is_fused_experts(shared)
    assert not mt.is_fused_experts(nn.Linear(2, 2))
    assert not mt.is_fused_experts(model.model.layers[0].mlp.gate)
    plan = plan_of("qwen2_moe", 2)
    assert plan.spec("model.layers.0.mlp.shared_expert.down_proj").role == Role.ROW
