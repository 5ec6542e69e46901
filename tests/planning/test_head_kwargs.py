"""Keyword inputs with one slice per head, found from the forward (xtp/planning/head_kwargs.py):
a model that builds per-head biases outside its attention module, and masks shared by all
heads, one of them with as many query positions as heads in the probe's 4 tokens.

Tier: plans and thread-rank numerics (in-process, fp32, relative error <= 1e-5).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import xtp
from thread_ranks import rel_err, run_sharded
from xtp.planning.head_kwargs import layout_of, wide_sizes

HEADS, D, HIDDEN, VOCAB = 4, 8, 32, 23


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.o = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x, *, head_bias, flat_bias, dim0_bias, shared_mask, query_mask):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, -1, D).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2)                               # (b, heads, s, s)
        scores = scores + head_bias                                    # (b, heads, 1, s)
        scores = scores + flat_bias.view(b, -1, 1, s)                  # (b * heads, 1, s)
        scores = scores + dim0_bias[:, :, -s:]                         # (heads, 1, max_len)
        scores = scores + shared_mask + query_mask[:, None]            # (b, 1, s, s), (b, s, s)
        out = torch.softmax(scores, -1) @ v
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class _Model(nn.Module):
    """Per-head biases and masks made in the model's forward and handed to the attention."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=HEADS, hidden_size=HIDDEN,
                                      vocab_size=VOCAB)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.attn = _Attention()
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids):
        b, s = input_ids.shape
        slopes = torch.arange(1, HEADS + 1, dtype=torch.float32) / HEADS
        pos = torch.arange(s, dtype=torch.float32)
        head_bias = (slopes[:, None, None] * pos).expand(b, HEADS, 1, s)
        flat_bias = (-slopes[:, None, None] * pos).expand(b, HEADS, 1, s).reshape(b * HEADS, 1, s)
        dim0_bias = 0.5 * slopes[:, None, None] * torch.arange(16, dtype=torch.float32)
        causal = torch.full((s, s), -1e9).triu(1)
        shared_mask = causal.expand(b, 1, s, s)
        query_mask = (0.01 * pos[:, None] * pos).expand(b, s, s)
        h = self.embed(input_ids)
        return self.head(h + self.attn(h, head_bias=head_bias, flat_bias=flat_bias,
                                        dim0_bias=dim0_bias, shared_mask=shared_mask,
                                        query_mask=query_mask))


@pytest.mark.parametrize("tp", [2, 3])
def test_per_head_inputs_are_cut_and_shared_masks_left(tp):
    """Only the per-head biases are cut, though the probe's 4 tokens equal the 4 heads (the
    query mask's (1, 4, 4) looks per-head there; the wider probe tells them apart); the shards
    match the unsharded model at 4 tokens too (where the query mask is (b, 4, 4) again)."""
    torch.manual_seed(0)
    model = _Model().eval()
    plan = xtp.plan(model, tp)
    assert {(m, kw, layout) for m, kw, layout, _, _ in plan.head_sliced_kwargs} == {
        ("attn", "head_bias", "heads_dim1"), ("attn", "flat_bias", "batch_x_heads"),
        ("attn", "dim0_bias", "heads_dim0")}
    for tokens in (4, 6):
        ids = torch.randint(0, VOCAB, (2, tokens), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = model(ids)
            outs = run_sharded(model, tp, lambda m, ids=ids: m(ids))
        assert max(rel_err(o, want) for o in outs) <= 1e-5, tokens


def test_the_plan_table_lists_the_cut_inputs():
    text = str(xtp.plan(_Model().eval(), 3))
    assert "per-head keyword inputs, cut to each rank's heads:" in text
    assert "  attn dim0_bias (heads_dim0): heads 0-1 / 2 / 3" in text


def test_wide_probe_sizes_avoid_the_head_count():
    for heads in range(1, 40):
        batch, tokens = wide_sizes(heads)
        assert len({heads, batch, tokens, batch * heads}) == 4 or heads == 1


@pytest.mark.parametrize("shape,want", [
    ((12, 1, 7), "batch_x_heads"),      # batch 3 x 4 heads
    ((4, 1, 64), "heads_dim0"),         # no batch dimension
    ((3, 4, 1, 7), "heads_dim1"),
    ((1, 4, 7, 7), "heads_dim1"),       # broadcast over the batch
    ((3, 1, 7, 7), None),               # shared by every head
    ((3, 7, 7), None),
    ((), None),
])
def test_layout_from_the_wide_probe(shape, want):
    assert layout_of(shape, 4, 3) == want


class _OneSequenceModel(_Model):
    """Runs on one sequence only: the wider probe cannot run."""

    def forward(self, input_ids):
        if input_ids.shape[0] != 1:
            raise ValueError("one sequence at a time")
        return super().forward(input_ids)


def test_a_failed_wide_probe_leaves_the_inputs_whole_with_a_note():
    plan = xtp.plan(_OneSequenceModel().eval(), 2)
    assert plan.head_sliced_kwargs == ()
    assert any(n.startswith("keyword inputs with a dimension as large as the head count were "
                            "left whole: the probe on 3 sequences of 7 tokens") for n in plan.notes)
