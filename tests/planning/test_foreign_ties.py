"""A weight shared by a layer xtp shards and a module of a kind xtp does not shard (a custom
embedding class tied to the LM head, e.g. I-BERT's quantisable embedding): the layer keeps the
whole weight too. Sharding it anyway untied the two, and a rank held more than the whole model
(issue 17).

Tier: plan (in-process) and the bytes a rank holds after an in-process thread-rank shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thread_ranks import rel_err, run_sharded
from xtp.planning.derive import derive_plan
from xtp.planning.spec import Role

V, H = 31, 8


class CustomEmbedding(nn.Module):
    """An embedding that is no nn.Embedding (xtp has no kind for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(V, H))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"vocab_size": V})()
        self.embed = CustomEmbedding()
        self.head = nn.Linear(H, V, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids, **_):
        return self.head(torch.tanh(self.embed(input_ids)))


def test_weight_tied_to_an_unknown_module_stays_whole():
    torch.manual_seed(0)
    model = Model().eval()
    plan = derive_plan(model, 2)
    assert plan.spec("head").role == Role.REPLICATE
    assert "tied weights head kept replicated" in plan.notes
    ids = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        got = run_sharded(model, 2, lambda m: (m(ids), m.head.weight is m.embed.weight), plan=plan)
    assert all(tied for _, tied in got)
    assert max(rel_err(out, want) for out, _ in got) <= 1e-5
