"""Each role's layer issues exactly its collectives, and only those (torch's test_tp_style does
the same per parallel style).

Tier: in-process thread-ranks (tests/helpers/thread_ranks.py): ``xtp.shard`` on a small plain
PyTorch model at tp 2, then each sharded module's forward alone on every rank, counting the
collectives its communicator sees. The real-process proof is the parity suite.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from thread_ranks import run_sharded
from xtp.sharding.state import sharded_plan

VOCAB, HIDDEN, INNER = 16, 8, 12


class TinyLM(nn.Module):
    """Embedding -> an MLP pair on the residual stream -> an LM head (no transformers)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=VOCAB)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.up = nn.Linear(HIDDEN, INNER)
        self.down = nn.Linear(INNER, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, **kwargs):
        h = self.embed(input_ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h)


def _calls_per_module(model: nn.Module) -> dict[str, list[str]]:
    """Run each sharded module's forward once; the collectives each one issued."""
    comm = model.head.tp_comm
    ids = torch.tensor([[1, 5, 9, 14]])
    hidden = torch.randn(1, 4, HIDDEN, generator=torch.Generator().manual_seed(0))
    inputs = {"embed": ids, "up": hidden, "down": torch.relu(model.up(hidden)), "head": hidden}
    out = {}
    for name, x in inputs.items():
        before = len(comm.calls)
        getattr(model, name)(x)
        out[name] = comm.calls[before:]
    return out


@pytest.fixture(scope="module")
def calls_and_roles():
    torch.manual_seed(0)
    model = TinyLM()
    return run_sharded(model, 2, lambda m: (_calls_per_module(m),
                                            {n: sharded_plan(m).spec(n).role
                                             for n in ("embed", "up", "down", "head")}))


@pytest.mark.parametrize("module, role, calls", [
    ("embed", "vocab_embedding", ["all_reduce"]),
    ("up", "column", []),
    ("down", "row", ["all_reduce"]),
    ("head", "lm_head", ["all_gather"]),
])
def test_each_role_issues_its_collectives_only(calls_and_roles, module, role, calls):
    for rank_calls, roles in calls_and_roles:
        assert roles[module] == role
        assert rank_calls[module] == calls
