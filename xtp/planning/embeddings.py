"""Step 4 of planning: embeddings and the LM head.

The input embedding with ``vocab_size`` rows is vocab-parallel (one all-reduce); the Linear that
produces the model output with ``vocab_size`` features is the parallel LM head (one all-gather
of the logits). Both split the vocabulary evenly. A module a rule matches stays whole; so does
an input embedding whose weight the forward also uses outside the calls of the modules holding
it (``logits = hidden @ embed.weight.T`` in the model's own forward): each rank would compute
with its slice of the rows only. A weight tied to a Linear LM head is used inside that head's
call, which is sharded the same way (:mod:`xtp.planning.ties`).
"""

from __future__ import annotations

from . import model_table as mt
from .draft import Draft
from .partition import Partition, split_even
from .probe import INPUT, OUTPUT
from .spec import Collective, Role, Split, WeightKind
from .weights import in_out


def plan_embeddings(draft: Draft) -> None:
    """Vocab-parallel input embeddings and the parallel LM head, with their collectives."""
    vocab = mt.vocab_size(draft.config)
    if not isinstance(vocab, int) or vocab < draft.tp:
        draft.notes.append("no vocabulary size in the config: embeddings stay replicated")
        return
    part = Partition(split_even(vocab, draft.tp))
    ranges = [(part.range(r),) for r in range(draft.tp)]
    g = draft.graph
    for name in g.order:
        kind = draft.kinds.get(name)
        mod = draft.modules[name]
        if (kind == WeightKind.EMBEDDING and g.producers.get(name) == {INPUT}
                and mod.weight.shape[0] == vocab and name not in draft.rules):
            if name in g.used_outside:
                draft.kept_whole[name] = ("forward: its weight is used outside the lookup, "
                                          "where a rank's slice of the rows would not do")
                draft.note(f"embedding {name} kept replicated: the forward uses its weight "
                           "outside the lookup")
                continue
            draft.specs[name] = draft.spec(
                name, Role.VOCAB_EMBEDDING, "structure: input embedding with vocab_size rows",
                split=Split.VOCAB, ranges=ranges)
            draft.collectives.append(Collective("all_reduce", name, mod.weight.shape[1]))
        elif (draft.is_linear(name) and g.consumers.get(name) == {OUTPUT}
              and in_out(mod)[1] == vocab and name not in draft.specs
              and name not in draft.rules):
            draft.specs[name] = draft.spec(
                name, Role.LM_HEAD, "structure: produces the output over vocab_size features",
                split=Split.OUT, ranges=ranges)
            draft.collectives.append(Collective("all_gather", name, vocab))
