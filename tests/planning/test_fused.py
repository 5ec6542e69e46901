"""Fused layouts inferred from the forward (xtp.planning.fused), on models no table names.

Tier: plans on stand-in models written here; numeric checks with thread-ranks
(tests/helpers/thread_ranks.py, fp32, relative error <= 1e-5 against the unsharded model).
A fused layer is split only when its forward shows a layout xtp can split; any other order
is refused with a typed error, never sliced wrongly.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import xtp
from thread_ranks import rel_err, run_sharded
from xtp.errors import UnclassifiedModuleError
from xtp.planning.spec import Layout, Role

HIDDEN, VOCAB = 24, 37


class _Attention(nn.Module):
    """Fused q/k/v in one of several orders; ``order`` is how the forward reads it."""

    def __init__(self, heads: int, kv: int, order: str) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = heads, kv  # head-count attributes xtp localises
        self.d, self.order = HIDDEN // heads, order
        self.qkv = nn.Linear(HIDDEN, (heads + 2 * kv) * self.d)
        self.o = nn.Linear(heads * self.d, HIDDEN)

    def forward(self, x):
        b, s, _ = x.shape
        y = self.qkv(x)
        if self.order == "interleaved_unbind":  # per head [q, k, v], unbound from a 5-D view
            q, k, v = y.reshape(b, s, self.num_heads, 3, self.d).unbind(3)
        else:
            widths = {"q": self.num_heads * self.d, "k": self.num_kv_heads * self.d,
                      "v": self.num_kv_heads * self.d}
            parts = dict(zip(self.order, torch.split(y, [widths[c] for c in self.order], -1)))
            q, k, v = (parts[c].unflatten(-1, (-1, self.d)) for c in "qkv")
        k = k.repeat_interleave(self.num_heads // self.num_kv_heads, -2)
        v = v.repeat_interleave(self.num_heads // self.num_kv_heads, -2)
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k), -1)
        return self.o(torch.einsum("bhqk,bkhd->bqhd", att, v).flatten(-2))


class _MLP(nn.Module):
    def __init__(self, concat: bool, width: int = 40) -> None:
        super().__init__()
        self.concat = concat
        self.gate_up = nn.Linear(HIDDEN, 2 * width)
        self.down = nn.Linear(width, HIDDEN)

    def forward(self, x):
        y = self.gate_up(x)
        gate, up = y.chunk(2, -1) if self.concat else y.unflatten(-1, (-1, 2)).unbind(-1)
        return self.down(torch.nn.functional.silu(gate) * up)


class _Model(nn.Module):
    def __init__(self, heads: int, kv: int, order: str = "qkv", concat: bool = True,
                 mlp_width: int = 40) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv,
                                      hidden_size=HIDDEN, vocab_size=VOCAB)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.attn = _Attention(heads, kv, order)
        self.mlp = _MLP(concat, mlp_width)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        h = h + self.attn(h)
        return self.head(h + self.mlp(h))


def _check(model: nn.Module, tp: int) -> float:
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
    return max(rel_err(o, want) for o in run_sharded(model, tp, lambda m: m(ids)))


@pytest.mark.parametrize("heads,kv,order,layout,tp", [
    (6, 2, "qkv", Layout.QKV_CONCAT, 3),                   # GQA concat, 2 KV heads at tp 3
    (6, 6, "kqv", Layout.QKV_CONCAT, 2),                   # MHA: thirds in any order split alike
    (6, 6, "interleaved_unbind", Layout.QKV_INTERLEAVED, 3),
    (4, 1, "qkv", Layout.QKV_CONCAT, 2),                   # MQA
])
def test_inferred_attention_layout_matches_unsharded(heads, kv, order, layout, tp):
    torch.manual_seed(0)
    model = _Model(heads, kv, order).eval()
    plan = xtp.plan(model, tp)
    assert (plan.spec("attn.qkv").role, plan.spec("attn.qkv").layout) == (Role.COLUMN, layout)
    assert plan.spec("mlp.gate_up").layout == Layout.GATE_UP_CONCAT
    assert _check(model, tp) <= 1e-5


@pytest.mark.parametrize("tp", [2, 4])
def test_gate_up_as_wide_as_the_attention_heads(tp):
    """[gate | up] whose halves are num_heads x head_dim wide (the row's input is cut by heads,
    2, 2, 1, 1 at tp 4): each half cut like the row's input."""
    torch.manual_seed(0)
    model = _Model(6, 6, mlp_width=HIDDEN).eval()
    plan = xtp.plan(model, tp)
    spec = plan.spec("mlp.gate_up")
    assert (spec.role, spec.layout) == (Role.COLUMN, Layout.GATE_UP_CONCAT)
    assert _check(model, tp) <= 1e-5


def test_gqa_layout_the_forward_reads_in_another_order_is_refused():
    """[k | v | q] with fewer KV heads than heads: no known layout; a typed error, not a
    wrong slicing."""
    with torch.device("meta"):
        model = _Model(6, 2, "kvq")
    with pytest.raises(UnclassifiedModuleError, match="attn.qkv"):
        xtp.plan(model, 2)


def test_interleaved_gate_up_is_refused():
    """[g0, u0, g1, u1, ...] (a view into (..., 40, 2)): not [gate | up]; refused."""
    with torch.device("meta"):
        model = _Model(6, 6, concat=False)
    with pytest.raises(UnclassifiedModuleError, match="mlp.gate_up"):
        xtp.plan(model, 2)


def test_replay_of_an_empty_output_gives_no_evidence():
    """An expert the probe's few tokens never reached recorded an output of shape (0, width):
    no layout can be read from it (transformers 4.x's per-expert modules crashed the plan)."""
    from xtp.planning.fused import replay

    assert replay([], (0, 128)) is None and replay([], ()) is None
    root, values = replay([], (2, 4))
    assert root.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]] and values == []
