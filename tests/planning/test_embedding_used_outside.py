"""An input embedding whose weight the forward also uses outside the lookup (logits as
``hidden @ embed.weight.T`` in the model's own forward, no LM head module) stays whole: split
by vocabulary, each rank's logits would cover its slice of the vocabulary only (issue 17). A
weight tied to a Linear LM head is used inside that head's call and stays vocab-parallel.

Tier: plan (in-process); the gloo parity run is in tests/sharding/test_parity.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import scratch_models
from xtp.planning.derive import derive_plan
from xtp.planning.spec import Role, Split


@pytest.mark.parametrize("tp", [2, 3])
def test_embedding_used_outside_its_call_stays_whole(tp):
    plan = derive_plan(scratch_models.build("scratch_shared_logits"), tp)
    spec = plan.spec("tok_embeddings")
    assert spec.role == Role.REPLICATE
    assert spec.reason == ("forward: its weight is used outside the lookup, where a rank's "
                           "slice of the rows would not do")
    assert ("embedding tok_embeddings kept replicated: the forward uses its weight outside the "
            "lookup") in plan.notes
    assert plan.spec("layers.0.w1").role == Role.COLUMN  # the rest is still split


@pytest.mark.parametrize("name,embedding", [("nanogpt", "wte"),
                                            ("scratch_llama", "tok_embeddings")])
def test_embedding_used_only_by_modules_holding_it_stays_vocab_parallel(name, embedding):
    """nanogpt: the LM head is tied to the embedding; scratch_llama: a head of its own."""
    model = scratch_models.build(name)
    model.config = SimpleNamespace(vocab_size=scratch_models.VOCAB)
    spec = derive_plan(model, 2).spec(embedding)
    assert spec.role == Role.VOCAB_EMBEDDING and spec.split == Split.VOCAB
