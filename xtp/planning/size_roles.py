"""What role a module's int attribute plays where the forward uses it as a size: a *count*
(how many heads a tensor is split into), a *width* (how wide each piece is) or a *repeat
factor* (how often each KV head is repeated for the query heads of its group).

The probe traces every int attribute of the model's modules (:mod:`xtp.planning.traced`); for
the ops below applied to activations of a projection it records which attributes fed which
role (:attr:`~xtp.planning.probe.FlowGraph.roles`: source -> role -> attribute origins):

* ``"width"``: the *last* size of a ``view``/``reshape``/``unflatten``, made of one attribute
  alone (a head split puts the head width last: ``view(b, s, heads, head_dim)``, ``view(b *
  heads, s, head_dim)``; a merged width ``heads * head_dim`` is no head width).
* ``"count"``: any other size of those ops (the head count comes before the head width, also
  in ``view(b, s, heads, 3, head_dim)``); a size before the last one of a new tensor
  (``torch.zeros((1, heads, q, k))``, a per-head bias) whose tensor then meets the
  projection's activations (the factory's output is tagged by :func:`tag_factory` and the probe
  follows it like a parameter until it does); and any attribute in the sizes of a split or
  the bounds of a slice of the projection's *whole* output features (``qkv.split([heads * d,
  kv * d, kv * d])``, ``qkv[..., q : q + self.num_kv_heads * self.head_dim]``: a fused output
  cut at offsets made of head counts), also when the output was first viewed into heads and
  the cut is along the head dimension (Falcon's multi-query ``qkv.view(b, s, -1, d).split(
  [heads, 1, 1], dim=-2)``: the dimensions from the cut on hold the whole output). A slice of
  a dimension of another size (a head's first ``rotary_dim`` features) says nothing.
* ``"repeat"``: a size ``expand`` grows from 1, a ``repeat``/``tile`` multiplier other than 1,
  the ``repeats`` of ``repeat_interleave`` (``k[:, :, None].expand(b, kv, groups, s, d)`` or
  ``repeat_interleave(k, groups, dim=1)``), when it comes from one attribute alone; the
  attributes of a factor computed from several (``num_heads // num_kv_heads``) are counts.

:func:`xtp.planning.heads.head_updates` turns those into per-rank local values: a repeat factor
equal to heads per KV head becomes the rank's own ratio; a count (never also a width: an
attribute whose value equals the head count by chance, ``head_dim == num_heads``, is a width)
equal to the query (KV) head count becomes the rank's count. Nothing here knows attribute
names.
"""

from __future__ import annotations

import math

import torch

from .traced import DIVIDED, TracedInt, origins

_T = torch.Tensor
#: ops whose size arguments split a tensor's dimensions into new ones
SHAPE_OPS = {_T.view: 1, _T.reshape: 1, torch.reshape: 1, _T.unflatten: 2}
#: ops splitting a tensor by sizes along a dimension: (sizes argument, dim argument)
SPLIT_OPS = {_T.split: (1, 2), _T.split_with_sizes: (1, 2), torch.split: (1, 2)}
#: tensor factories: sizes from the first argument on (``new_*``: from the second)
FACTORIES = {torch.zeros: 0, torch.ones: 0, torch.empty: 0, torch.full: 0, torch.rand: 0,
             torch.randn: 0, _T.new_zeros: 1, _T.new_ones: 1, _T.new_empty: 1, _T.new_full: 1}
#: ops that repeat a tensor along dimensions (how KV heads are shared by query heads)
REPEAT_OPS = frozenset({_T.expand, _T.repeat, _T.tile, torch.tile, _T.repeat_interleave,
                        torch.repeat_interleave})


def _sizes(args: tuple, start: int) -> list:
    """The sizes passed from ``args[start]`` on, one tuple/list/Size argument flattened."""
    rest = list(args[start:])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return list(rest[0])
    return rest


def _attrs(obj) -> set[str]:
    return {o for o in origins(obj) if o.startswith("@")}


def _shape_roles(func, args: tuple) -> dict[str, set[str]]:
    if func not in SHAPE_OPS or not args:
        return {}
    sizes = _sizes(args, SHAPE_OPS[func])
    if not sizes:
        return {}
    return {"count": set().union(*(_attrs(s) for s in sizes[:-1])), "width": _single(sizes[-1])}


def _single(obj) -> set[str]:
    """The attribute behind ``obj`` when it comes from exactly one traced attribute."""
    found = origins(obj) if isinstance(obj, TracedInt) else set()
    return found if len(found) == 1 and next(iter(found)).startswith("@") else set()


def _repeat_factors(func, args: tuple, kwargs: dict) -> list:
    """The repeat factors of an expand/repeat/tile/repeat_interleave applied to ``args[0]``."""
    if func not in REPEAT_OPS or not args or not isinstance(args[0], torch.Tensor):
        return []
    if func in (_T.repeat_interleave, torch.repeat_interleave):
        return [args[1] if len(args) > 1 else kwargs.get("repeats")]
    sizes = _sizes(args, 1) or list(kwargs.get("size", kwargs.get("dims", ())) or ())
    if func is not _T.expand:
        return [s for s in sizes if isinstance(s, int) and int(s) != 1]
    shape = list(args[0].shape)
    grown = []
    for i in range(1, len(sizes) + 1):  # aligned from the right, as expand aligns them
        old = shape[-i] if i <= len(shape) else 1
        if old == 1 and isinstance(sizes[-i], int) and int(sizes[-i]) not in (1, -1):
            grown.append(sizes[-i])
    return grown


def repeat_roles(func, args: tuple, kwargs: dict) -> tuple[set[str], set[str]]:
    """(repeat factors made of one attribute, the attributes of factors computed from several:
    ``num_heads // num_kv_heads``, each a count, divided or not) of a repeat op."""
    single, several = set(), set()
    for factor in _repeat_factors(func, args, kwargs):
        found = {o for o in origins(factor) if o.startswith("@")} if isinstance(
            factor, TracedInt) else set()
        if len(origins(factor)) == 1 and found:
            single |= found
        else:
            several |= {o.removesuffix(DIVIDED) for o in found}
    return single, several


def _cut_dim(func, args: tuple, kwargs: dict) -> tuple[int, set[str]]:
    """(dimension, attribute origins of the sizes or bounds) of a split by sizes, a slice
    ``x[..., a:b]`` / ``x[:, :, a:b]`` or ``narrow(x, dim, start, length)``; (-1, set()) for
    anything else."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        return -1, set()
    if func in SPLIT_OPS:
        at, dim_at = SPLIT_OPS[func]
        sizes = args[at] if len(args) > at else next(
            (kwargs[k] for k in ("split_size", "split_sizes", "split_size_or_sections")
             if k in kwargs), None)
        dim = args[dim_at] if len(args) > dim_at else kwargs.get("dim", 0)
        found = _attrs(sizes)
        return (int(dim) % max(x.dim(), 1), found) if found else (-1, set())
    if func in (_T.narrow, torch.narrow) and len(args) > 2:
        found = _attrs(args[2:])
        return (int(args[1]) % max(x.dim(), 1), found) if found else (-1, set())
    if func is not _T.__getitem__ or len(args) < 2:
        return -1, set()
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    if any(i is None or isinstance(i, torch.Tensor) for i in index):
        return -1, set()  # new dimensions or advanced indexing: positions do not map
    dims = [i for i, item in enumerate(index) if isinstance(item, slice) and _attrs(item)]
    if len(dims) != 1:
        return -1, set()
    pos = dims[0]
    if Ellipsis in index and index.index(Ellipsis) < pos:
        pos = x.dim() - (len(index) - pos)
    return pos, _attrs(index[dims[0]])


def record_roles(graph, func, args: tuple, kwargs: dict, src: set[str]) -> None:
    """Add the attribute origins behind op ``func``'s sizes, by role, to ``graph.roles`` of
    each of the activations' sources ``src``."""
    roles = _shape_roles(func, args)
    repeats, counted = repeat_roles(func, args, kwargs)
    dim, cut = _cut_dim(func, args, kwargs)
    for s in src:
        width = graph.out_shapes.get(s, ())[-1:]
        # a cut of the dimensions from ``dim`` on cuts the whole output when they hold its width
        whole = bool(cut) and width == (math.prod(args[0].shape[dim:]),)
        if roles or repeats or counted or whole:
            mine = graph.roles[s]
            mine["count"] |= roles.get("count", set()) | counted | (cut if whole else set())
            mine["width"] |= roles.get("width", set())
            mine["repeat"] |= repeats


def tag_factory(func, args: tuple, kwargs: dict, out, attr: str) -> None:
    """Tag the output of a tensor factory with the attribute origins behind every size but the
    last (in ``out.<attr>``, the probe's parameter channel: see ``_track_params``)."""
    if func not in FACTORIES or not isinstance(out, torch.Tensor):
        return
    start = FACTORIES[func]
    full = func in (torch.full, _T.new_full)  # (size, fill_value): the size is one argument
    sizes = _sizes(args[start:start + 1], 0) if full else _sizes(args, start)
    found = set().union(*(_attrs(s) for s in sizes[:-1])) if len(sizes) > 1 else set()
    if found:
        try:
            setattr(out, attr, found | getattr(out, attr, set()))
        except (AttributeError, RuntimeError):
            pass
