"""Fused layouts found from the forward: how a fused projection's output features map to q/k/v
heads (or gate/up), read from what the model itself does with that output.

The probe (:mod:`xtp.planning.probe`) records every layout op (split, chunk, view, transpose,
indexing, ...) applied to a layer's output. Replaying those ops on an *index tensor* (feature
``f`` holds the value ``f``) tells where each feature goes:

* attention: the *head tensors* are the last tensors of that lineage whose varying dimensions
  are ``(..., heads, head_dim)`` with ``heads`` equal to the query or the KV head count; feature
  ``f`` is then (query or KV, head, position in the head);
* MLP: the last tensors of the lineage, each ``width`` features (the row partner's input) wide;
  feature ``f`` is then (part, position).

That map is compared with each known :class:`~xtp.planning.spec.Layout`'s; the one that agrees
feature for feature is the layer's layout. No table, no names: the layout is what the forward
does.
"""

from __future__ import annotations

import torch

from .probe import FlowGraph, LayoutNode, Ref
from .spec import Layout

#: (kind, index, position) of every output feature: kind "q"/"kv" (or "h" when every head
#: tensor has the same head count) for attention, the part's number for MLPs
FeatureMap = tuple[tuple[object, int, int], ...]


def _resolve(obj, values: list, root: torch.Tensor):
    if isinstance(obj, Ref):
        return root if obj.node < 0 else values[obj.node]
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return type(obj)(_resolve(o, values, root) for o in obj)
    return obj


def replay(nodes: list[LayoutNode], shape: tuple[int, ...]) -> tuple[torch.Tensor, list] | None:
    """The index tensor of ``shape`` (value = feature number along the last dimension) and the
    value of every recorded node on it; ``None`` when an op does not replay, or when the
    recorded output was empty (an expert the probe's tokens never reached: no evidence)."""
    if not shape or 0 in shape:
        return None
    n = shape[-1]
    root = torch.arange(n).repeat(max(1, int(torch.Size(shape[:-1]).numel()))).view(shape)
    values: list = []
    for node in nodes:
        try:
            out = node.func(*_resolve(node.args, values, root),
                            **{k: _resolve(v, values, root) for k, v in node.kwargs.items()})
        except Exception:  # noqa: BLE001 - an op that does not replay: no inference
            return None
        values.append(out[node.item] if node.item is not None else out)
    return root, values


def _varying_dims(t: torch.Tensor) -> list[int]:
    """Dimensions along which the feature index changes (not batch, sequence or broadcast)."""
    dims = []
    for d in range(t.dim()):
        if t.shape[d] > 1 and not bool((t.narrow(d, 0, 1) == t).all()):
            dims.append(d)
    return dims


def _refs_in(obj, found: set[int]) -> set[int]:
    if isinstance(obj, Ref):
        found.add(obj.node)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _refs_in(o, found)
    return found


def _parents(nodes: list[LayoutNode]) -> list[set[int]]:
    """The nodes each node's op read (-1: the layer's output itself)."""
    return [_refs_in((node.args, tuple(node.kwargs.values())), set()) for node in nodes]


def _last(candidates: set[int], parents: list[set[int]]) -> list[int]:
    """Candidates with no candidate among their descendants."""
    ancestors_of_candidates: set[int] = set()
    for c in candidates:
        stack = list(parents[c])
        while stack:
            p = stack.pop()
            if p >= 0 and p not in ancestors_of_candidates:
                ancestors_of_candidates.add(p)
                stack.extend(parents[p])
    return sorted(candidates - ancestors_of_candidates)


def _head_view(t: torch.Tensor, head_dim: int) -> torch.Tensor | None:
    """``t``'s feature indices as (heads, head_dim), heads in row-major order of its varying
    dimensions (a single varying dimension of ``head_dim``: one head), or ``None``."""
    dims = _varying_dims(t)
    if not dims or t.shape[dims[-1]] != head_dim:
        return None
    idx = t.permute(*[d for d in range(t.dim()) if d not in dims], *dims)
    idx = idx.reshape(-1, *[t.shape[d] for d in dims])[0]
    return idx.reshape(-1, head_dim)


def feature_map_heads(graph: FlowGraph, name: str, heads: tuple[int, int, int]
                      ) -> FeatureMap | None:
    """(kind, head, position) of each output feature of ``name``, from its head tensors."""
    H, K, D = heads
    nodes = graph.layout_nodes.get(name, [])
    played = replay(nodes, graph.out_shapes.get(name, ())) if name in graph.out_shapes else None
    if played is None:
        return None
    root, values = played
    views = {i: v for i, t in enumerate(values) if (v := _head_view(t, D)) is not None
             and v.shape[0] in (H, K)}
    out: dict[int, tuple[object, int, int]] = {}
    for i in _last(set(views), _parents(nodes)):
        v = views[i]
        kind = "h" if H == K else ("q" if v.shape[0] == H else "kv")
        for h in range(v.shape[0]):
            for d in range(D):
                f = int(v[h, d])
                if out.setdefault(f, (kind, h, d)) != (kind, h, d):
                    return None
    if sorted(out) != list(range(root.shape[-1])):
        return None
    return tuple(out[f] for f in range(root.shape[-1]))


def own_heads(graph: FlowGraph, name: str, counts: tuple[int, ...], out: int
              ) -> tuple[int, int] | None:
    """``(heads, width)`` when the forward views all ``out`` output features of ``name`` into
    ``heads`` heads (one of ``counts``) of ``width = out / heads`` features each, head after
    head (feature ``f`` in head ``f // width``): a per-head projection whose head width is its
    own (multi-head latent attention's ``q_b_proj`` / ``kv_b_proj``: query-key and value widths
    differ from the config's head size). ``None`` when no such view covers every feature."""
    for n in dict.fromkeys(counts):
        if n < 1 or out % n:
            continue
        d = out // n
        want = tuple(("h", f // d, f % d) for f in range(out))
        if feature_map_heads(graph, name, (n, n, d)) == want:
            return n, d
    return None


def feature_map_parts(graph: FlowGraph, name: str, width: int) -> FeatureMap | None:
    """(part, position) of each output feature of ``name``, from its ``width``-wide parts."""
    nodes = graph.layout_nodes.get(name, [])
    played = replay(nodes, graph.out_shapes.get(name, ())) if name in graph.out_shapes else None
    if played is None:
        return None
    root, values = played
    parts = {}
    for i, t in enumerate(values):
        dims = _varying_dims(t)
        if len(dims) == 1 and t.shape[dims[0]] == width:
            parts[i] = t.movedim(dims[0], -1).reshape(-1, width)[0]
    out: dict[int, tuple[object, int, int]] = {}
    last = _last(set(parts), _parents(nodes))
    for part, i in enumerate(sorted(last, key=lambda j: int(parts[j].min()))):
        for pos in range(width):
            f = int(parts[i][pos])
            if out.setdefault(f, (part, pos, 0)) != (part, pos, 0):
                return None
    if sorted(out) != list(range(root.shape[-1])):
        return None
    return tuple(out[f] for f in range(root.shape[-1]))


def canonical_map(layout: Layout, heads: tuple[int, int, int] | None, width: int = 0
                  ) -> FeatureMap | None:
    """The feature map of ``layout`` (the row order :mod:`xtp.planning.layouts` slices)."""
    if layout == Layout.GATE_UP_CONCAT:
        return tuple((f // width, f % width, 0) for f in range(2 * width))
    H, K, D = heads
    q, kv = ("h", "h") if H == K else ("q", "kv")
    if layout == Layout.QKV_CONCAT:
        return (tuple((q, f // D, f % D) for f in range(H * D))
                + tuple((kv, f // D, f % D) for f in range(K * D)) * 2)
    if layout == Layout.QKV_INTERLEAVED:
        if H != K:
            return None
        return tuple((q, f // (3 * D), f % D) for f in range(3 * H * D))
    if layout == Layout.QKV_GROUPED:
        g = H // K
        out = []
        for k in range(K):
            out += [(q, k * g + j, d) for j in range(g) for d in range(D)]
            out += [(kv, k, d) for d in range(D)] * 2
        return tuple(out)
    return None


def infer_layout(graph: FlowGraph, name: str, heads: tuple[int, int, int] | None,
                 width: int, split_by_heads: bool) -> Layout | None:
    """The layout of fused column ``name`` feeding a row with ``width`` input features (its
    heads split when ``split_by_heads``), found from the forward; ``None`` when the forward
    shows none of the known layouts."""
    if split_by_heads:
        found = feature_map_heads(graph, name, heads)
        candidates = (Layout.QKV_INTERLEAVED, Layout.QKV_CONCAT, Layout.QKV_GROUPED)
    else:
        found = feature_map_parts(graph, name, width)
        candidates = (Layout.GATE_UP_CONCAT,)
    if found is None:
        return None
    for layout in candidates:
        if canonical_map(layout, heads, width) == found:
            return layout
    return None


def infer_head_shape(graph: FlowGraph) -> tuple[int, int, int] | None:
    """``(num_heads, num_kv_heads, head_dim)`` from the views into heads the forward makes,
    for a model whose config does not say (a plain PyTorch model): the head dim is the widest
    last dimension of any view into (heads, head_dim) (rotary halves are narrower); the query
    and KV head counts are the most and fewest heads seen with that head dim. ``None`` when the
    forward makes no such view, or the counts do not group."""
    seen: list[tuple[int, int]] = []
    for name, nodes in graph.layout_nodes.items():
        played = replay(nodes, graph.out_shapes[name]) if name in graph.out_shapes else None
        if played is None:
            continue
        for t in played[1]:
            dims = _varying_dims(t)
            if len(dims) >= 2:
                d = t.shape[dims[-1]]
                seen.append((int(torch.Size([t.shape[x] for x in dims]).numel()) // d, d))
    if not seen:
        return None
    head_dim = max(d for _, d in seen)
    counts = [n for n, d in seen if d == head_dim]
    heads, kv = max(counts), min(counts)
    return (heads, kv, head_dim) if heads % kv == 0 else None


_T = torch.Tensor
#: layout ops that take part of a tensor (a piece, a slice, one index)
_PIECES = frozenset({_T.split, _T.split_with_sizes, _T.chunk, _T.tensor_split, _T.unbind,
                     _T.narrow, _T.select, _T.__getitem__, torch.split, torch.chunk,
                     torch.tensor_split, torch.unbind, torch.narrow, torch.select})


def splits_heads(graph: FlowGraph, col: str, head_dim: int) -> bool:
    """True when the forward takes a piece of ``col``'s output holding some of its heads but
    not all (``torch.chunk(v, 2, dim=1)`` on the heads: head ``i`` is combined with head
    ``i + n/2``, so contiguous heads per rank would pair the wrong heads). Pieces within every
    head (rotary halves) or along batch/sequence hold every head. Unknown (no replay): False."""
    shape = graph.out_shapes.get(col)
    nodes = graph.layout_nodes.get(col, [])
    if not shape or not nodes or shape[-1] % head_dim:
        return False
    found = replay(nodes, shape)
    if found is None:
        return False
    n_heads = shape[-1] // head_dim
    for node, value in zip(nodes, found[1]):
        if node.func in _PIECES and isinstance(value, torch.Tensor) and value.numel():
            heads = torch.unique(value // head_dim).numel()
            if heads < n_heads:
                return True
    return False
