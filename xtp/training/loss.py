"""The loss of a sharded causal LM without full-vocabulary logits on any rank: the parallel LM
head's local vocabulary slice (:func:`local_logits`) and a vocab-parallel cross entropy.

Shapes: logits ``(batch, seq, local_vocab)`` on each rank, labels ``(batch, seq)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..accelerators import Communicator
from ..sharding.layers import ParallelLMHead


@contextmanager
def local_logits(model: nn.Module) -> Iterator[None]:
    """Inside this block the parallel LM head returns this rank's vocabulary slice of the
    logits, shape ``(..., local_vocab)``, instead of gathering ``(..., vocab)``."""
    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    for m in heads:
        m.tp_gather_output = False
    try:
        yield
    finally:
        for m in heads:
            m.tp_gather_output = True


def lm_head_of(model: nn.Module) -> ParallelLMHead | None:
    """The model's parallel LM head, if it has one."""
    return next((m for m in model.modules() if isinstance(m, ParallelLMHead)), None)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, comm, start, ignore_index):
        # logits: (N, V_local) this rank's vocabulary slice; target: (N,) global ids
        logits = logits.float()
        local_max = logits.max(dim=-1).values
        gmax = comm.all_reduce_max(local_max.clone())
        shifted = logits - gmax.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = comm.all_reduce(exp.sum(dim=-1))
        local_t = target - start
        valid = (target != ignore_index)
        mine = valid & (local_t >= 0) & (local_t < logits.shape[-1])
        idx = local_t.clamp(0, logits.shape[-1] - 1)
        picked = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * mine
        picked = comm.all_reduce(picked)
        loss = (sum_exp.log() - picked) * valid
        count = valid.sum().clamp(min=1)
        ctx.save_for_backward(exp, sum_exp, idx, mine, valid)
        ctx.count = count
        return loss.sum() / count

    @staticmethod
    def backward(ctx, grad):
        exp, sum_exp, idx, mine, valid = ctx.saved_tensors
        g = exp / sum_exp.unsqueeze(-1)
        g.scatter_add_(-1, idx.unsqueeze(-1), -mine.to(g.dtype).unsqueeze(-1))
        g = g * (valid.to(g.dtype) * grad / ctx.count).unsqueeze(-1)
        return g, None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    comm: Communicator,
    vocab_start: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy over non-ignored targets, from vocabulary-sharded logits.

    Args:
        local_logits: ``(..., V_local)``: this rank's logits for vocabulary ids
            ``[vocab_start, vocab_start + V_local)``.
        target: ``(...)`` global token ids (``ignore_index`` skipped).

    Equals ``F.cross_entropy`` of the gathered logits; no rank ever holds ``(..., V)``. Three
    small collectives (max, sum of exponentials, target logit) over ``(...)``-shaped tensors.
    """
    flat = local_logits.reshape(-1, local_logits.shape[-1])
    return _VocabParallelCE.apply(flat, target.reshape(-1), comm, vocab_start, ignore_index)


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   **kwargs) -> torch.Tensor:
    """Next-token loss of a sharded causal LM without full-vocabulary logits on any rank.

    ``labels`` as in transformers (shifted inside; ``-100`` ignored)."""
    head = lm_head_of(model)
    if head is None:  # tp 1 or a replicated head: the model's own loss
        return model(input_ids, labels=labels, **kwargs).loss
    with local_logits(model):
        logits = model(input_ids, **kwargs).logits
    start = sum(head.tp_sizes[: head.tp_comm.rank])
    return vocab_parallel_cross_entropy(logits[:, :-1], labels[:, 1:], head.tp_comm, start)
