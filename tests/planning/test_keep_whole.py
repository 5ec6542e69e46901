"""Pairs with a column of no known layout are kept whole (replicated, exact), not refused, when
they are more than a lone fused layer: several columns (a per-head gate next to q/k/v), or a
parent holding parameters of its own (a state-space / convolution mixer). The rest of the
model is still split. A lone fused column in a bare parent stays refused
(tests/planning/test_plan.py::test_unclassified_fused_layer_suggests_a_rule), and so does any
unknown column when the head counts were guessed from the forward
(tests/planning/test_plain_models.py).

Tier: plans on stand-in models written here; numeric checks with thread-ranks
(tests/helpers/thread_ranks.py, fp32, relative error <= 1e-5 against the unsharded model).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import xtp
from thread_ranks import rel_err, run_sharded
from xtp.planning.spec import Role

HIDDEN, HEADS, VOCAB = 24, 4, 37
D = HIDDEN // HEADS


class _GatedAttention(nn.Module):
    """q/k/v/o plus ``g``: one sigmoid gate per head (``HEADS`` output features) scaling each
    head's output; ``g`` matches no head or fused layout."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.g = nn.Linear(HIDDEN, HEADS)
        self.o = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, HEADS, D).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, -1) @ v  # (b, heads, s, D)
        att = att * torch.sigmoid(self.g(x)).transpose(1, 2).unsqueeze(-1)
        return self.o(att.transpose(1, 2).reshape(b, s, HIDDEN))


class _Mixer(nn.Module):
    """One fused input projection split into [x | z | dt] (dt: 3 features, no head layout), a
    decay parameter of the mixer's own, and the output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(HIDDEN, 2 * HIDDEN + 3)
        self.decay = nn.Parameter(torch.rand(3))
        self.out = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        h, z, dt = self.inp(x).split([HIDDEN, HIDDEN, 3], -1)
        rate = torch.sigmoid(dt * self.decay).mean(-1, keepdim=True)
        return self.out(torch.cumsum(h * rate, 1) * torch.nn.functional.silu(z))


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(HIDDEN, 40), nn.Linear(40, HIDDEN)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _Model(nn.Module):
    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=HEADS, hidden_size=HIDDEN,
                                      vocab_size=VOCAB)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mixer, self.mlp = mixer, _MLP()
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        h = h + self.mixer(h)
        return self.head(h + self.mlp(h))


@pytest.mark.parametrize("mixer,row,cols,unknown", [
    (_GatedAttention, "mixer.o", ["mixer.q", "mixer.k", "mixer.v", "mixer.g"],
     f"mixer.g (Linear, {HEADS} output features)"),
    (_Mixer, "mixer.out", ["mixer.inp"], f"mixer.inp (Linear, {2 * HIDDEN + 3} output features)"),
])
@pytest.mark.parametrize("tp", [2, 3])
def test_unknown_column_keeps_its_pair_whole_and_the_rest_splits(mixer, row, cols, unknown, tp):
    torch.manual_seed(0)
    model = _Model(mixer()).eval()
    plan = xtp.plan(model, tp)
    for name in [row, *cols]:
        spec = plan.spec(name)
        assert spec.role == Role.REPLICATE, name
        assert spec.reason.startswith(f"kept whole: cannot classify {unknown}"), spec.reason
    assert any(n.startswith(f"{row} and its partners kept replicated") for n in plan.notes)
    assert (plan.spec("mlp.up").role, plan.spec("mlp.down").role) == (Role.COLUMN, Role.ROW)
    assert plan.spec("embed").role == Role.VOCAB_EMBEDDING
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
    assert max(rel_err(o, want) for o in run_sharded(model, tp, lambda m: m(ids))) <= 1e-5
