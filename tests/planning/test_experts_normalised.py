"""Fused experts (transformers' experts interface) whose forward normalises the experts'
outputs before returning them (transformers 5.25's Ergo: a per-expert RMSNorm after the down
product, inside the experts module). Split by the intermediate dimension, each rank's down
products are partial sums until the all-reduce at the module's output: normalising them there
gave a silently wrong model (rel. error 0.16 at tp 2). Such a container is now kept whole,
with a plan note; the same container without the norm is still split.

Tier: plans and one in-process thread-rank parity check per case (fp32, rel. error <= 1e-5);
the real-process proof is ``xtp coverage --types ergo`` (transformers >= 5.25).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thread_ranks import rel_err, run_sharded
from xtp.planning.derive import derive_plan
from xtp.planning.spec import Role

E, H, INTER, V = 3, 16, 12, 29


class PerExpertNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(E, H) + 0.5)

    def forward(self, x, expert):
        return F.rms_norm(x, (x.shape[-1],), eps=1e-6) * self.weight[expert]


class Experts(nn.Module):
    """The experts interface's layout (``up_proj`` (E, H, I), ``down_proj`` (E, I, H),
    transposed, no gate); every token through every expert, weighted by the router."""

    has_gate, is_transposed = False, True

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.up_proj = nn.Parameter(torch.randn(E, H, INTER) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(E, INTER, H) * 0.3)
        self.norm = norm
        if norm == "module":
            self.post_expert_norm = PerExpertNorm()

    def forward(self, x, weights):
        out = torch.zeros_like(x)
        for e in range(E):
            y = F.relu(x @ self.up_proj[e]) @ self.down_proj[e]
            if self.norm == "module":
                y = self.post_expert_norm(y, e)
            elif self.norm == "inline":
                y = y / y.norm(dim=-1, keepdim=True)
            out = out + y * weights[:, e:e + 1]
        return out


class Model(nn.Module):
    def __init__(self, norm: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.router = nn.Linear(H, E)
        self.experts = Experts(norm)
        self.head = nn.Linear(H, V)

    def forward(self, input_ids, **_):
        x = self.embed(input_ids).flatten(0, 1)  # (T, H)
        return self.head(x + self.experts(x, self.router(x).softmax(-1)))


def _parity(model: Model, plan) -> float:
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        outs = run_sharded(model, 2, lambda m: m(ids), plan=plan)
    return max(rel_err(o, want) for o in outs)


@pytest.mark.parametrize("norm", ["module", "inline"])
def test_experts_normalising_their_outputs_are_kept_whole(norm):
    torch.manual_seed(0)
    model = Model(norm).eval()
    plan = derive_plan(model, 2)
    assert "experts" not in {s.name for s in plan.specs if s.role == Role.EXPERTS}
    where = "experts.post_expert_norm" if norm == "module" else "experts"
    assert any(n.startswith(f"experts experts kept whole: its forward normalises the experts' "
                            f"outputs ({where})") for n in plan.notes), plan.notes
    assert _parity(model, plan) <= 1e-5


def test_the_same_experts_without_a_norm_are_split():
    torch.manual_seed(0)
    model = Model("none").eval()
    plan = derive_plan(model, 2)
    spec = plan.spec("experts")
    assert spec.role == Role.EXPERTS and spec.full == INTER
    assert not any("kept whole" in n for n in plan.notes)
    assert _parity(model, plan) <= 1e-5
