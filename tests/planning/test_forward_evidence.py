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
    a width to make local (nor is num_attention_heads, which its forward does not read)."""
    case = next(c for c in CASES if c.id == "codegen")
    plan = xtp.plan(case.config(), 2)
    assert {u.attr for u in plan.attr_updates if u.module.endswith(".attn")} == set()


# -- per-head parameters and norms over all heads, from the forward (issue 17) -----------------


def test_per_head_parameters_are_split_with_their_heads():
    """Sinks and gate biases (one per head), a query bias (one per feature), an MLP scale and a
    logit scale (one per output feature) get exactly the ranges of the heads/features they
    scale, here with uneven heads and replicated KV heads (6 heads, 2 KV heads, tp 3)."""
    import scratch_models

    plan = xtp.plan(scratch_models.build("scratch_sinks"), 3)
    attn = plan.spec("layers.0.attention")
    assert attn.role == Role.HEAD_PARAMS
    split = {s.param: s.ranges for s in attn.params}
    heads = (((0, 2),), ((2, 3),), ((3, 6),))
    assert split["sinks"] == split["gate_bias"] == heads
    assert split["q_bias"] == plan.spec("layers.0.attention.wq").ranges
    block = {s.param: s.ranges for s in plan.spec("layers.0").params}
    assert block == {"w1_scale": plan.spec("layers.0.w1").ranges}
    head = {s.param: s.ranges for s in plan.spec("output").params}
    assert head["logit_scale"] == head["weight"] == plan.spec("output").ranges


class _SmallHeads(nn.Module):
    """4 heads of 4 features: a per-head norm weight (4 long, as many as heads) or a norm
    without parameters over all 16 features of the attention output."""

    def __init__(self, norm_all_heads: bool, swap_halves: bool = False,
                 input_width: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.q_norm = nn.Parameter(torch.rand(4) + 0.5)
        self.norm_all_heads, self.swap_halves = norm_all_heads, swap_halves
        self.input_width = input_width

    def forward(self, h):
        B, T, width = h.shape
        q, k, v = (p(h).view(B, T, -1, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.swap_halves:  # head i reads the values of head i + 2 (mod 4)
            v = torch.cat(torch.chunk(v, 2, dim=1)[::-1], dim=1)
        y = torch.softmax((q * self.q_norm) @ k.transpose(-1, -2), -1) @ v
        y = y.transpose(1, 2).reshape(B, T, width if self.input_width else -1)
        if self.norm_all_heads:
            y = y / y.norm(dim=-1, keepdim=True)
        return self.o(y)


class _Small(nn.Module):
    def __init__(self, norm_all_heads: bool, swap_halves: bool = False,
                 input_width: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.attn = _SmallHeads(norm_all_heads, swap_halves, input_width)

    def forward(self, input_ids):
        return self.attn(self.embed(input_ids))


def test_a_parameter_as_long_as_one_head_is_never_split():
    plan = xtp.plan(_Small(False), 2)
    assert plan.spec("attn.q").role == Role.COLUMN
    assert plan.spec("attn") is None  # q_norm (head_dim == heads == 4) stays whole


def test_a_norm_without_parameters_over_all_heads_keeps_the_pair_whole():
    plan = xtp.plan(_Small(True), 2)
    for name in ("q", "k", "v", "o"):
        assert plan.spec(f"attn.{name}").role == Role.REPLICATE, name
    assert "reduces activations of attn.q over 16 features" in plan.spec("attn.o").reason


def test_heads_taken_in_groups_keep_the_pair_whole():
    """Differential attention style: the forward chunks the value heads into two halves, so
    head i meets head i + n/2; contiguous heads per rank would pair the wrong ones."""
    plan = xtp.plan(_Small(False, swap_halves=True), 2)
    for name in ("q", "k", "v", "o"):
        assert plan.spec(f"attn.{name}").role == Role.REPLICATE, name
    assert "takes some of the heads of attn.v apart" in plan.spec("attn.o").reason


def test_a_width_read_off_the_input_shape_shards_the_pair_padded():
    """``reshape(B, T, width)`` with ``width`` from the input's shape (TrOCR, FSMT, LED): that
    width stays full on every rank, so the pair is sharded padded: each column writes its own
    heads into a full-width output (zeros elsewhere), the row reads only its own heads, and no
    head count or per-head parameter of the module changes."""
    plan = xtp.plan(_Small(False, input_width=True), 3)
    for name in ("q", "k", "v"):
        spec = plan.spec(f"attn.{name}")
        assert (spec.role, spec.padded, spec.full) == (Role.COLUMN, True, 16), name
        assert spec.ranges == (((0, 8),), ((8, 12),), ((12, 16),)), name  # 2, 1, 1 heads
    o = plan.spec("attn.o")
    assert (o.role, o.padded, o.ranges) == (Role.ROW, True, (((0, 8),), ((8, 12),), ((12, 16),)))
    assert "read off the shape of another tensor" in " ".join(plan.notes)
    assert plan.attr_updates == () and plan.spec("attn") is None  # q_norm stays whole


class _SoftmaxGate(nn.Module):
    """up -> softmax over its features (or elementwise gelu) -> down: a softmax normalises over
    every feature of ``up``, so a column split of ``up`` would give each rank a different
    normaliser."""

    def __init__(self, softmax: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.up, self.down = nn.Linear(16, 24), nn.Linear(24, 16)
        self.softmax = softmax

    def forward(self, input_ids):
        h = self.up(self.embed(input_ids))
        h = nn.Softmax(dim=-1)(h) if self.softmax else torch.nn.functional.gelu(h)
        return self.down(h)


def test_a_softmax_over_a_pairs_features_keeps_it_whole():
    plan = xtp.plan(_SoftmaxGate(True), 2)
    assert plan.spec("up").role == plan.spec("down").role == Role.REPLICATE
    assert "reduces activations of up over 24 features" in plan.spec("down").reason
    control = xtp.plan(_SoftmaxGate(False), 2)  # elementwise: split
    assert (control.spec("up").role, control.spec("down").role) == (Role.COLUMN, Role.ROW)


# -- a forward that rebuilds its own modules (issue 17) ----------------------------------------


class _FullAttention(nn.Module):
    """Attention whose merged width is an attribute computed from the config at construction."""

    def __init__(self, config) -> None:
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.merged = config.num_attention_heads * self.head_dim
        self.q = nn.Linear(config.hidden_size, self.merged)
        self.k = nn.Linear(config.hidden_size, self.merged)
        self.v = nn.Linear(config.hidden_size, self.merged)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, self.head_dim).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        out = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return out.transpose(1, 2).reshape(b, s, self.merged)


class _SwitchingBlock(nn.Module):
    """Replaces its attention module by a new one on its first call (as transformers' BigBird
    switches to full attention for a short input), keeping the projections."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config, self.switched = config, False
        self.attn = _FullAttention(config)
        self.o = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        if not self.switched:
            new = _FullAttention(self.config)
            new.q, new.k, new.v = self.attn.q, self.attn.k, self.attn.v
            self.attn, self.switched = new, True
        return x + self.o(self.attn(x))


class _Switching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(hidden_size=32, num_attention_heads=4, vocab_size=19)
        self.embed = nn.Embedding(19, 32)
        self.block = _SwitchingBlock(self.config)
        self.head = nn.Linear(32, 19)

    def forward(self, input_ids):
        return self.head(self.block(self.embed(input_ids)))


def test_modules_the_forward_rebuilds_are_probed_as_rebuilt():
    """The probe's forward replaces the attention module; the planner sees the new module's
    merged width (probed again, as the model is then), gives it each rank's value, leaves no
    traced int behind in the model, and the shards match the unsharded model."""
    from thread_ranks import rel_err, run_sharded
    from xtp.planning.traced import TracedInt

    torch.manual_seed(0)
    model = _Switching().eval()
    plan = xtp.plan(model, 2)
    assert [(u.module, u.attr, u.values) for u in plan.attr_updates] == [
        ("block.attn", "merged", (16, 16))]
    assert not any(isinstance(v, TracedInt) for m in model.modules() for v in vars(m).values())
    ids = torch.randint(0, 19, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        outs = run_sharded(model, 2, lambda m: m(ids))
    assert max(rel_err(o, want) for o in outs) <= 1e-5
