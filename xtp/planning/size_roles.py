"""What role a module's int attribute plays where the forward uses it as a size: a *count*
(how many heads a tensor is split into) or a *repeat factor* (how often each KV head is
repeated for the query heads of its group).

The probe traces every int attribute of the model's modules (:mod:`xtp.planning.traced`); for
the ops below applied to activations of a projection it records which attributes fed:

* a **count**: a size of ``view``/``reshape``/``unflatten`` that is *not* the last one of the
  new shape. A head split puts the head count before the head width (``view(b, s, heads,
  head_dim)``, ``view(b * heads, s, head_dim)``, ``view(b, s, heads, 3, head_dim)``); the last
  size is a width (a head width or a merged width), never a count. So an attribute whose value
  equals a head width by chance (``head_dim == num_heads``) is not mistaken for the count.
* a count too: a size before the last one of a new tensor (``torch.zeros((1, heads, q, k))``,
  a per-head bias) whose tensor then meets the projection's activations; the factory's output
  is tagged (:func:`tag_factory`) and the probe follows it like a parameter until it does.
* a **repeat factor**: a size ``expand`` grows from 1, a ``repeat``/``tile`` multiplier other
  than 1, the ``repeats`` of ``repeat_interleave`` (``k[:, :, None].expand(b, kv, groups, s, d)``
  or ``repeat_interleave(k, groups, dim=1)``: the number of query heads per KV head).

:func:`xtp.planning.heads.head_updates` turns those into per-rank local values: a count equal
to the query (KV) head count becomes the rank's query (KV) head count, a repeat factor equal
to heads per KV head becomes the rank's own ratio. Nothing here knows attribute names.
"""

from __future__ import annotations

import torch

from .traced import origins

_T = torch.Tensor
#: ops whose size arguments split a tensor's dimensions into new ones
SHAPE_OPS = {_T.view: 1, _T.reshape: 1, torch.reshape: 1, _T.unflatten: 2}
#: ops that repeat a tensor along dimensions (how KV heads are shared by query heads)
#: tensor factories: sizes from the first argument on (``new_*``: from the second)
FACTORIES = {torch.zeros: 0, torch.ones: 0, torch.empty: 0, torch.full: 0, torch.rand: 0,
             torch.randn: 0, _T.new_zeros: 1, _T.new_ones: 1, _T.new_empty: 1, _T.new_full: 1}
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


def count_origins(func, args: tuple) -> set[str]:
    """Attribute origins behind every size but the last of a view/reshape/unflatten."""
    if func not in SHAPE_OPS or not args:
        return set()
    sizes = _sizes(args, SHAPE_OPS[func])
    return set().union(*(_attrs(s) for s in sizes[:-1])) if len(sizes) > 1 else set()


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


def repeat_origins(func, args: tuple, kwargs: dict) -> set[str]:
    """Attribute origins behind the repeat factors of an expand/repeat/tile/repeat_interleave
    applied to ``args[0]``."""
    if func not in REPEAT_OPS or not args or not isinstance(args[0], torch.Tensor):
        return set()
    if func in (_T.repeat_interleave, torch.repeat_interleave):
        return _attrs(args[1] if len(args) > 1 else kwargs.get("repeats"))
    sizes = _sizes(args, 1) or list(kwargs.get("size", kwargs.get("dims", ())) or ())
    if func is not _T.expand:
        return set().union(*(_attrs(s) for s in sizes if int(s) != 1)) if sizes else set()
    shape = list(args[0].shape)
    grown = set()
    for i in range(1, len(sizes) + 1):  # aligned from the right, as expand aligns them
        old = shape[-i] if i <= len(shape) else 1
        if old == 1 and int(sizes[-i]) not in (1, -1):
            grown |= _attrs(sizes[-i])
    return grown


def record_roles(graph, func, args: tuple, kwargs: dict, src: set[str]) -> None:
    """Add the counts and repeat factors of op ``func`` to ``graph.count_reads`` /
    ``graph.repeat_reads`` of each of the activations' sources ``src``."""
    counts, repeats = count_origins(func, args), repeat_origins(func, args, kwargs)
    for s in src if counts or repeats else ():
        graph.count_reads[s] |= counts
        graph.repeat_reads[s] |= repeats
