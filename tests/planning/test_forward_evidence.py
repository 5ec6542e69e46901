"""What the probe's forward shows decides what is split and what changes (issue 17): a Linear
subclass with a forward of its own is never split; an int attribute the forward divides before
using it as a size (a group width) keeps its full value.

Tier: plans (in-process). codegen's numbers are the parity suite's ``codegen`` case.
"""

from __future__ import annotations

import torch
from torch import nn

import xtp
from parity_cases import CASES
from xtp.planning.spec import Role


class GroupedLinear(nn.Linear):
    """Block-diagonal: each of ``groups`` input groups has its own slice of the weight."""

    def __init__(self, per_group: int, out_features: int, groups: int) -> None:
        super().__init__(per_group, out_features, bias=False)
        self.groups = groups

    def forward(self, x):
        w = self.weight.view(self.groups, -1, x.shape[-1]).transpose(1, 2)
        y = torch.bmm(x.reshape(-1, self.groups, x.shape[-1]).transpose(0, 1), w)
        return y.transpose(0, 1).reshape(*x.shape[:-2], -1)


class GroupedOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.up = nn.Linear(16, 32)
        self.grouped = GroupedLinear(8, 24, 4)  # 4 groups of 8 -> 4 x 6
        self.down = nn.Linear(24, 16)

    def forward(self, input_ids):
        h = self.up(self.embed(input_ids))
        return self.down(self.grouped(h.unflatten(-1, (4, 8))))


def test_linear_subclass_with_its_own_forward_is_never_split():
    plan = xtp.plan(GroupedOut(), 2)
    for name in ("grouped", "down", "up"):
        assert plan.spec(name).role == Role.REPLICATE, name


def test_an_attribute_the_forward_divides_keeps_its_value():
    """codegen: qkv is viewed by 3 * (embed_dim // mp_num); embed_dim is divided, so it is not
    a width to make local (its head count n_head still is)."""
    case = next(c for c in CASES if c.id == "codegen")
    plan = xtp.plan(case.config(), 2)
    attrs = {u.attr for u in plan.attr_updates if u.module.endswith(".attn")}
    assert "embed_dim" not in attrs
    assert "num_attention_heads" in attrs
