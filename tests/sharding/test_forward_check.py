"""The shard-time check (:mod:`xtp.sharding.check`): a plan whose local shapes the model's own
forward cannot run is refused with ShardedForwardError before the model is touched.

Tier: units (in-process, fake tensors; no ranks). Over real ranks the same refusal is what
``xtp coverage`` reports for such types (gpt_oss, beam, granite_swa, ... before their fixes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xtp
from xtp.errors import ShardedForwardError
from xtp.planning.spec import Role
from xtp.sharding.check import ShapeCommunicator, check_local_forward, rank_layouts


class TupleHeadsAttention(nn.Module):
    """Heads viewed by a tuple attribute: no int the planner can make local."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.head_shape = (heads, dim // heads)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, *self.head_shape).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class IntHeadsAttention(TupleHeadsAttention):
    """The same attention with its head count in an int attribute (made local by the plan)."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__(dim, heads)
        self.num_heads, self.head_dim = heads, dim // heads
        del self.head_shape

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class Tiny(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        dim = attn.q.in_features
        self.embed = nn.Embedding(16, dim)
        self.attn = attn
        self.head = nn.Linear(dim, 16, bias=False)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return self.head(h + self.attn(h))


def _snapshot(model: nn.Module) -> list:
    return [(n, type(m), dict(vars(m))) for n, m in model.named_modules()] + [
        (n, p.data_ptr(), tuple(p.shape)) for n, p in model.named_parameters()]


def test_a_head_count_the_plan_misses_is_refused_and_the_model_kept():
    torch.manual_seed(0)
    model = Tiny(TupleHeadsAttention())
    plan = xtp.plan(model, 2)
    assert plan.spec("attn.q").role == Role.COLUMN  # the planner splits it ...
    before = _snapshot(model)
    with pytest.raises(ShardedForwardError) as err:  # ... the check refuses it
        check_local_forward(model, plan)
    assert str(err.value) == (
        "the forward of Tiny cannot run sharded this way: with rank 0's local weights and head "
        "counts (tp_size=2), attn raises RuntimeError: shape '[1, 4, 4, 8]' is invalid for "
        "input of size 64. It uses a size xtp did not make local (a head count kept where the "
        "planner does not look, a per-head parameter); keep it replicated with "
        "rules={'attn.*': 'replicate'}, try another tp_size, or report this model type")
    assert _snapshot(model) == before


def test_the_suggested_rule_passes_the_check():
    model = Tiny(TupleHeadsAttention())
    check_local_forward(model, xtp.plan(model, 2, rules={"attn.*": "replicate"}))


@pytest.mark.parametrize("tp", [2, 3])
def test_a_plan_the_forward_can_run_passes(tp):
    model = Tiny(IntHeadsAttention(dim=48, heads=6))
    plan = xtp.plan(model, tp)
    assert plan.spec("attn.q").role == Role.COLUMN
    check_local_forward(model, plan)


def test_one_check_per_distinct_rank_layout():
    model = Tiny(IntHeadsAttention(dim=40, heads=5))  # 5 heads: 3 + 2 at tp 2, 2 + 2 + 1 at 3
    assert sorted(rank_layouts(xtp.plan(model, 2)).values()) == [0, 1]
    assert sorted(rank_layouts(xtp.plan(model, 3)).values()) == [0, 2]
    model = Tiny(IntHeadsAttention(dim=32, heads=4))
    assert list(rank_layouts(xtp.plan(model, 2)).values()) == [0]


def test_shape_communicator_gives_the_shapes_of_the_collectives():
    comm = ShapeCommunicator(3, 1)
    x = torch.zeros(2, 5)
    assert comm.all_reduce(x) is x
    assert comm.all_gather(x, -1).shape == (2, 15)
    assert comm.all_gather(x, 1, [4, 5, 6]).shape == (2, 15)
    assert comm.reduce_scatter(torch.zeros(2, 15), 1, [4, 5, 6]).shape == (2, 5)
