"""Expert containers outside transformers' experts interface (issue 17): a module that
multiplies two 3-D parameters batch-wise (``torch.bmm``) as an expert MLP is split by every
expert's intermediate dimension, found from the forward (the parameter names do not matter;
Llama 4's ``Llama4TextExperts`` is one). A forward xtp cannot prove exact keeps it whole:
interleaved gate/up halves, or anything added after the down product.

Tier: plans and one in-process thread-rank parity check per tp (fp32, rel. error <= 1e-5); the
real-process proof is ``xtp coverage --types llama4_text``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thread_ranks import rel_err, run_sharded
from xtp.planning.derive import derive_plan
from xtp.planning.spec import Role

E, H, INTER, V = 3, 16, 10, 29


class Experts(nn.Module):
    """Every expert on every token: (E, T, H) in, (E, T, H) out."""

    def __init__(self, gated: str = "chunk", after: bool = False) -> None:
        super().__init__()
        self.gated, self.after = gated, after
        width = INTER if gated == "none" else 2 * INTER
        self.w_in = nn.Parameter(torch.randn(E, H, width) * 0.3)
        self.w_out = nn.Parameter(torch.randn(E, INTER, H) * 0.3)

    def forward(self, x):
        h = torch.bmm(x, self.w_in)
        if self.gated == "chunk":
            g, u = h.chunk(2, dim=-1)
            h = F.silu(g) * u
        elif self.gated == "interleaved":
            h = F.silu(h[..., ::2]) * h[..., 1::2]
        else:
            h = F.gelu(h)
        out = torch.bmm(h, self.w_out)
        return out * 2 + 1 if self.after else out.contiguous()


class Model(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.router = nn.Linear(H, E)
        self.experts = Experts(**kw)
        self.head = nn.Linear(H, V)

    def forward(self, input_ids, **_):
        x = self.embed(input_ids).flatten(0, 1)                  # (T, H)
        weights = self.router(x).softmax(-1).t().unsqueeze(-1)   # (E, T, 1)
        y = (self.experts(x.expand(E, -1, -1)) * weights).sum(0)
        return self.head(x + y)


def _model(**kw) -> Model:
    torch.manual_seed(0)
    return Model(**kw).eval()


@pytest.mark.parametrize("gated", ["chunk", "none"])
@pytest.mark.parametrize("tp", [2, 3])
def test_expert_container_split_with_parity(gated, tp):
    model = _model(gated=gated)
    plan = derive_plan(model, tp)
    spec = plan.spec("experts")
    assert spec.role == Role.EXPERTS
    # intermediate 10 over tp: both [gate; up] halves cut at the same features
    sizes = [spec.local_extent(r) for r in range(tp)]
    assert sum(sizes) == INTER and min(sizes) > 0
    w_in = next(p for p in spec.params if p.param == "w_in")
    if gated == "chunk":
        assert [len(r) for r in w_in.ranges] == [2] * tp
        assert all(b[0] == a[0] + INTER for a, b in w_in.ranges)
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        outs = run_sharded(model, tp, lambda m: m(ids), plan=plan)
    assert max(rel_err(o, want) for o in outs) <= 1e-5


@pytest.mark.parametrize("kw", [{"gated": "interleaved"}, {"after": True}])
def test_expert_container_kept_whole_when_not_provably_exact(kw):
    plan = derive_plan(_model(**kw), 2)
    assert "experts" not in {s.name for s in plan.specs if s.role == Role.EXPERTS}
