"""Keyword inputs of an attention module that carry one slice per head for *all* heads (an
ALiBi bias, a mask with the bias folded in, built once outside the attention module), found
from the forward, and how each is laid out.

The probe follows every tensor a module receives as a keyword input that is neither an
activation nor made from parameters (:attr:`~xtp.planning.probe.FlowGraph.kwarg_shapes`) until
it first meets activations (:attr:`~xtp.planning.probe.FlowGraph.param_uses`). Such an input of
a split attention module that meets the pair's activations is a candidate. Which dimension holds
the heads is told by its shape in a second probe on ``batch`` sequences of ``tokens`` tokens,
both chosen different from the head count (in the first probe's one sequence of 4 tokens a
dimension of 4 may be the heads or the tokens):

* ``batch x heads`` first (``(batch * heads, ...)``, heads varying fastest, as a reshape of
  ``(batch, heads, ...)`` makes it: Bloom's ALiBi) -> layout ``batch_x_heads``;
* ``heads`` first, with no batch dimension (``(heads, 1, k)``: MPT's ALiBi) -> ``heads_dim0``;
* ``heads`` second, after a batch dimension of ``batch`` or 1 (``(batch, heads, q, k)``: Falcon's
  ALiBi and its per-head mask) -> layout ``heads_dim1``;
* anything else (a mask shared by all heads, ``(batch, 1, q, k)``) is left as it is.

Each rank's pre-hook (:func:`xtp.sharding.hooks.head_slicing_hook`) then keeps its own heads.
"""

from __future__ import annotations

from ..errors import PlanError
from .draft import Draft
from .partition import HeadPartition
from .probe import KWARG
from .trace import run_wide_probe

#: the layouts :func:`xtp.sharding.hooks.head_slicing_hook` cuts
BATCH_X_HEADS, HEADS_DIM0, HEADS_DIM1 = "batch_x_heads", "heads_dim0", "heads_dim1"


def wide_sizes(heads: int) -> tuple[int, int]:
    """(batch, tokens) for the second probe: a batch other than the head count, a token count
    other than the head count, the batch and their product."""
    batch = next(b for b in (3, 2, 5) if b != heads)
    tokens = next(t for t in (7, 11, 13, 17) if t not in (heads, batch, batch * heads))
    return batch, tokens


def layout_of(shape: tuple[int, ...] | None, heads: int, batch: int) -> str | None:
    """The per-head layout of a keyword input of ``shape`` in the wide probe, or ``None``."""
    if not shape:
        return None
    if shape[0] == batch * heads:
        return BATCH_X_HEADS
    if shape[0] == heads:
        return HEADS_DIM0
    if len(shape) >= 2 and shape[0] in (1, batch) and shape[1] == heads:
        return HEADS_DIM1
    return None


def _wide_shapes(draft: Draft) -> tuple[int, dict[str, tuple[int, ...]]]:
    """(batch, keyword input shapes) of the wide probe, run once per plan; no shapes where it
    cannot run (an encoder tower takes no token ids: its inputs are left whole, and the
    shard-time check refuses a layout whose shapes do not fit)."""
    if draft.wide_kwargs is None:
        batch, tokens = wide_sizes(draft.heads[0])
        try:
            shapes = run_wide_probe(draft.model, batch, tokens).kwarg_shapes
        except PlanError as exc:
            shapes = {}
            draft.note(f"keyword inputs with a dimension as large as the head count were left "
                       f"whole: the probe on {batch} sequences of {tokens} tokens that tells "
                       f"per-head inputs apart failed ({str(exc)[:160]})")
        draft.wide_kwargs = (batch, shapes)
    return draft.wide_kwargs


def head_sliced_kwargs(draft: Draft, attn_name: str, cols: list[str],
                       hp: HeadPartition) -> None:
    """Add to ``draft.head_sliced`` every per-head keyword input of attention module
    ``attn_name`` whose pair has columns ``cols``, split by heads as ``hp``."""
    prefix = f"{KWARG}{attn_name}:"
    heads = draft.heads[0]
    found = sorted(name for name, uses in draft.graph.param_uses.items()
                   if name.startswith(prefix) and uses & set(cols)
                   and heads in draft.graph.kwarg_shapes.get(name, ())[:2])  # may hold heads
    if not found:
        return
    batch, shapes = _wide_shapes(draft)
    for name in found:
        layout = layout_of(shapes.get(name), heads, batch)
        if layout is not None:
            draft.head_sliced.append((attn_name, name[len(prefix):], layout,
                                      tuple(hp.q.range(r) for r in range(draft.tp)), heads))
