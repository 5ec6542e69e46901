"""A per-token norm between a pair's columns and its row (a sub-norm over the MLP's
intermediate features before ``down``, one over the attention output before ``o``) is split
with the pair: each rank keeps its slice of the norm's weight (and bias) and the statistics are
summed over the ranks (:class:`xtp.sharding.layers.ParallelNorm`). What the norm computes is
found by running its forward (:func:`xtp.planning.norms.norm_kind`), whatever its class: a
hand-written RMS norm, torch's ``nn.LayerNorm`` and ``nn.RMSNorm``. A module with an
inner-width weight that is no per-token norm over the whole last dimension (a norm per group
of features) keeps its pair whole, as before.

Tier: plans on stand-in models written here; numeric checks with thread-ranks
(tests/helpers/thread_ranks.py, fp32, relative error <= 1e-5 against the unsharded model),
outputs and the norms' weight gradients.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import xtp
from thread_ranks import rel_err, run_sharded
from xtp.planning.norms import norm_kind
from xtp.planning.spec import Role

HIDDEN, HEADS, INTER, VOCAB = 24, 4, 40, 37
D = HIDDEN // HEADS


class _SubNorm(nn.Module):
    """An RMS norm written by hand, ``eps`` under a name of its own."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.tiny = 1e-6

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.tiny)).to(x.dtype)


class _GroupNorm(nn.Module):
    """Normalises each half of the features on its own: not a norm over the last dimension."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = 1e-6

    def forward(self, x):
        g = x.unflatten(-1, (2, -1))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.flatten(-2)


NORMS = {
    "hand-written rms": _SubNorm,
    "nn.LayerNorm": lambda w: nn.LayerNorm(w, eps=1e-5),
    # no bias parameter (an entry of None): the split layer must not invent one
    "nn.LayerNorm without bias": lambda w: nn.LayerNorm(w, eps=1e-5, bias=False),
    "nn.RMSNorm": lambda w: nn.RMSNorm(w, eps=1e-6),
}


class _Block(nn.Module):
    def __init__(self, norm) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in "qkvo")
        self.attn_norm = norm(HIDDEN)
        self.gate, self.up = (nn.Linear(HIDDEN, INTER, bias=False) for _ in "gu")
        self.mlp_norm = norm(INTER)
        self.down = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, D).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, -1) @ v
        x = x + self.o(self.attn_norm(att.transpose(1, 2).flatten(2)))
        return x + self.down(self.mlp_norm(torch.nn.functional.silu(self.gate(x)) * self.up(x)))


class _Model(nn.Module):
    def __init__(self, norm) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=HEADS, hidden_size=HIDDEN,
                                      vocab_size=VOCAB)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.block = _Block(norm)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids):
        return self.head(self.block(self.embed(input_ids)))


def _model(norm) -> _Model:
    torch.manual_seed(0)
    model = _Model(norm).eval()
    with torch.no_grad():  # weights (and biases) away from their initial ones and zeros
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if n.endswith("weight") else 0.0))
    return model


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("tp", [2, 3])
def test_sub_norms_split_with_their_pair_exactly(norm, tp):
    model = _model(NORMS[norm])
    plan = xtp.plan(model, tp)
    for name, role in [("block.o", Role.ROW), ("block.down", Role.ROW), ("block.up", Role.COLUMN),
                       ("block.attn_norm", Role.NORM), ("block.mlp_norm", Role.NORM)]:
        assert plan.spec(name).role == role, (name, plan.spec(name).reason)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    want = model(ids)
    want.pow(2).mean().backward()
    want_grads = {n: model.get_parameter(f"block.{n}.weight").grad
                  for n in ("attn_norm", "mlp_norm")}

    def run(m):
        with torch.enable_grad():
            out = m(ids)
            out.pow(2).mean().backward()
        return out.detach(), {n: m.get_parameter(f"block.{n}.weight").grad for n in want_grads}

    results = run_sharded(model, tp, run)
    assert max(rel_err(out, want.detach()) for out, _ in results) <= 1e-5
    for name, full in want_grads.items():
        ranges = plan.spec(f"block.{name}").ranges
        local = torch.cat([grads[name] for _, grads in results])
        idx = torch.cat([torch.arange(a, b) for r in range(tp) for a, b in ranges[r]])
        assert rel_err(local, full[idx]) <= 1e-5, name


@pytest.mark.parametrize("tp", [3])
def test_a_norm_per_group_of_features_keeps_its_pair_whole(tp):
    model = _model(_GroupNorm)
    assert norm_kind(model.block.mlp_norm, INTER) is None
    plan = xtp.plan(model, tp)
    for name in ("block.gate", "block.up", "block.down", "block.o"):
        assert plan.spec(name).role == Role.REPLICATE, name
    assert plan.spec("block.down").reason.startswith(
        f"kept whole: block.mlp_norm has a parameter of shape ({INTER},)")
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
    assert max(rel_err(o, want) for o in run_sharded(model, tp, lambda m: m(ids))) <= 1e-5


def test_norm_kind_reads_eps_and_the_formula_off_the_forward():
    assert norm_kind(_SubNorm(8), 8).kind == "rms"
    assert norm_kind(_SubNorm(8), 8).eps == 1e-6
    got = norm_kind(nn.LayerNorm(8, eps=1e-5), 8)
    assert (got.kind, got.eps, got.has_bias) == ("layer", 1e-5, True)
    assert norm_kind(nn.LayerNorm(8), 6) is None  # weight of another width
    assert norm_kind(nn.Linear(8, 8), 8) is None
