"""Attention heads in a pair: which output rows each column layer keeps, and what else changes
in the attention module when it holds only this rank's heads.

* Column ranges: a plain q (``num_heads x head_dim`` wide) or k/v (``num_kv_heads x head_dim``)
  projection is cut by heads; a fused projection by its layout, found from what the forward
  does with its output (:func:`xtp.planning.fused.infer_layout`, after checking its width).
* Attributes the forward uses as a head count, KV repeat factor or width (:mod:`.size_roles`)
  get per-rank local values; keyword inputs with one slice per head (:mod:`.head_kwargs`)
  are cut to this rank's heads; an
  attention module whose forward reshapes by its config's head counts gets a local config.
* Per-head bias tables the row reads (T5 relative attention bias) are split by heads.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnclassifiedModuleError
from .draft import Draft
from .fused import infer_layout
from .head_kwargs import head_sliced_kwargs
from .layouts import fused_ranges, fused_width, kv_ranges, q_ranges
from .partition import HeadPartition, Partition
from .render import collapse
from .spec import AttrUpdate, Layout, Ranges, Role, Split
from .traced import DIVIDED, module_origin
from .weights import in_out


def column_ranges(draft: Draft, col: str, width: int, hp: HeadPartition | None,
                  mlp: Partition | None, own: tuple[int, int] | None = None
                  ) -> tuple[Layout | None, list[Ranges]]:
    """(fused layout or None, per-rank output ranges) of column layer ``col`` feeding a row
    layer with ``width`` input features, split by heads ``hp`` or evenly by ``mlp``; ``own``:
    the column's own (heads, head width) when the forward views it into heads wider or
    narrower than the config's head size (multi-head latent attention).

    Raises:
        UnclassifiedModuleError: the width matches neither the heads nor a known fused layout
            (the message shows the rule that keeps it replicated).
    """
    out = in_out(draft.modules[col])[1]
    H, K, D = draft.heads if draft.heads else (0, 0, 0)
    tp = draft.tp
    if hp is not None and own is not None:
        n, d = own
        return None, [(q_ranges if n == H else kv_ranges)(hp, d, r) for r in range(tp)]
    if hp is not None and out == H * D:
        return None, [q_ranges(hp, D, r) for r in range(tp)]
    if hp is not None and out == K * D:
        return None, [kv_ranges(hp, D, r) for r in range(tp)]
    if hp is None and out == width:
        return None, [(mlp.range(r),) for r in range(tp)]
    layout = infer_layout(draft.graph, col, draft.heads, width, hp is not None)
    if layout is not None:
        need = fused_width(layout, hp, D, width if mlp is not None else 0)
        if need == out:
            return layout, [fused_ranges(layout, r, hp, D, mlp) for r in range(tp)]
    if hp is not None and out == 2 * width and infer_layout(
            draft.graph, col, draft.heads, width, False) == Layout.GATE_UP_CONCAT:
        # an MLP whose inner width happens to be num_heads x head_dim: [gate | up], each half
        # cut like the row's input (by whole heads' widths)
        parts = hp.q.scaled(D)
        return Layout.GATE_UP_CONCAT, [fused_ranges(Layout.GATE_UP_CONCAT, r, None, D, parts)
                                       for r in range(tp)]
    raise UnclassifiedModuleError(
        f"cannot classify {collapse(col)} ({type(draft.modules[col]).__name__}, "
        f"{out} output features) feeding {width} input features of its row partner: it looks "
        f"like a fused layer, but what the forward does with its output (splits, views into "
        f"heads, chunks) matches no fused layout xtp can split"
        + (f" (heads={H}, kv_heads={K}, head_dim={D})" if draft.heads else "")
        + f". If those head counts are wrong, pass the right ones (xtp.shard(model, heads=..., "
        f"kv_heads=...)); else keep it replicated with "
        f"rules={{'{collapse(col)}': 'replicate'}}, or report this model"
    )


def attention_name(row: str, cols: list[str]) -> str:
    """The longest module path the row and its columns share (their attention module)."""
    common = []
    for segs in zip(*[n.split(".") for n in [row, *cols]]):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return ".".join(common)


def _attr_updates(draft: Draft, attn_name: str, attn: nn.Module, hp: HeadPartition,
                  cols: list[str], own: dict[str, tuple[int, int]] | None = None) -> None:
    """Head counts and widths held by the attention module and its inner helpers, found from
    what the pair's forward does with each int attribute (:mod:`xtp.planning.size_roles`):

    * a KV repeat factor (``expand``/``repeat_interleave`` on KV heads) equal to the query heads
      per KV head becomes each rank's own ratio;
    * a head count (a size before the last of a view/reshape of the pair's activations, of a
      new tensor meeting them, or in the sizes or bounds cutting a fused output), never a
      width (the last size of such a view), equal to the query or KV head count becomes the
      rank's count;
    * a width the forward passed to a view/reshape/split of those activations (``self.n_embd``
      in ``qkv.split(self.n_embd, dim=2)``), equal to the full query or KV width, becomes the
      rank's width.

    An attribute merely equal to one of those values (a position count, a head width equal to
    the head count) is left alone, and so is one the forward only divides (a group's width)."""
    H, K, D = draft.heads
    local_q = [hp.local_heads(r) for r in range(draft.tp)]
    local_kv = [hp.local_kv_heads(r) for r in range(draft.tp)]
    groups = (H // K, tuple(q // kv for q, kv in zip(local_q, local_kv))) if H % K == 0 else None
    counts = {K: tuple(local_kv), H: tuple(local_q)}  # H wins when H == K (same locals then)
    widths = {H * D: tuple(q * D for q in local_q), K * D: tuple(kv * D for kv in local_kv)}
    if own:  # each column its own head width: its own full and local widths
        widths = {n * d: tuple((q if n == H else kv) * d for q, kv in zip(local_q, local_kv))
                  for n, d in own.values()}

    def union(table: dict) -> set:
        return set().union(*(table.get(c, set()) for c in cols))

    def role(name: str) -> set:
        return set().union(*(draft.graph.roles[c][name] for c in cols if c in draft.graph.roles))

    used, reads = union(draft.graph.layout_sizes), union(draft.graph.attr_reads)
    count_reads = role("count") | {o for o, uses in draft.graph.param_uses.items()
                                   if o.startswith("@") and uses & set(cols)}  # new tensors
    count_reads -= role("width")
    repeat_reads = role("repeat")
    holders = [(n, m) for n, m in attn.named_modules(prefix=attn_name)
               if n not in draft.kinds]  # the attention module and its inner helpers
    for holder_name, holder in holders:
        for attr, value in holder.__dict__.items():
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            origin = module_origin(holder_name, attr)
            if origin + DIVIDED in reads and origin not in reads:
                continue  # the forward only divides it (into a group width): that width stays
            if groups and origin in repeat_reads and value == groups[0]:
                full, local = groups
            elif origin in count_reads and value in counts:
                full, local = value, counts[value]
            elif value in widths and value in used and origin in reads:
                full, local = value, widths[value]
            else:
                continue
            if any(v != full for v in local):
                draft.attr_updates.append(AttrUpdate(holder_name, attr, full, tuple(local)))


def _config_updates(draft: Draft, attn_name: str, attn: nn.Module, hp: HeadPartition,
                    cols: list[str]) -> None:
    """Head-sliced keyword inputs (found from the forward: :mod:`.head_kwargs`), and a local
    config for an attention module whose forward reshapes the pair's activations by the
    config's head counts (seen in the probe: :attr:`~xtp.planning.probe.FlowGraph.config_reads`)."""
    head_sliced_kwargs(draft, attn_name, cols, hp)
    reads = set().union(*(draft.graph.config_reads.get(c, set()) for c in cols))
    if reads and getattr(attn, "config", None) is draft.config:
        draft.local_configs.append((attn_name, (
            ("num_attention_heads", tuple(hp.local_heads(r) for r in range(draft.tp))),
            ("num_key_value_heads", tuple(hp.local_kv_heads(r) for r in range(draft.tp))),
        )))


def kv_replication_note(hp: HeadPartition) -> str:
    """The plan's note on replicated KV heads: each rank's query and KV heads."""
    def heads(a: int, b: int) -> str:
        return str(a) if b - a == 1 else f"{a}-{b - 1}"
    per_rank = ", ".join(f"rank {r}: q {heads(*hp.q.range(r))} kv {heads(*hp.kv_ranges[r])}"
                         for r in range(hp.tp))
    return (f"{hp.num_kv_heads} KV heads over {hp.tp} ranks: each KV head is replicated on the "
            f"ranks whose query heads use it ({per_rank})")


def head_updates(draft: Draft, row: str, cols: list[str], hp: HeadPartition,
                 own: dict[str, tuple[int, int]] | None = None) -> None:
    """Everything besides the pair's own specs that follows from splitting its heads as ``hp``:
    attribute updates, head-sliced kwargs, local configs, per-head bias tables."""
    if hp.kv_replicated:
        draft.note(kv_replication_note(hp))
    attn_name = attention_name(row, cols)
    attn = draft.modules.get(attn_name)
    if attn is None:
        return
    _attr_updates(draft, attn_name, attn, hp, cols, own)
    _config_updates(draft, attn_name, attn, hp, cols)
    for name in sorted(draft.graph.producers.get(row, set()) & draft.head_biases):
        if name not in draft.specs:
            draft.specs[name] = draft.spec(
                name, Role.HEAD_EMBEDDING, "structure: one bias column per attention head",
                split=Split.OUT, ranges=[q_ranges(hp, 1, r) for r in range(draft.tp)])
