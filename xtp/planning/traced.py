"""Which config values feed which reshape: provenance of the config's ints during the probe.

For the probe's forward, every plain ``int`` attribute of the model's ``config`` is replaced by
a :class:`TracedInt` of the same value that remembers its name, and arithmetic on it keeps that
memory (``self.config.num_attention_heads * self.head_dim`` remembers
``num_attention_heads``). The probe records the names behind the sizes and indices each layout
op receives (:attr:`~xtp.planning.probe.FlowGraph.config_reads`), so the planner gives a local
config to exactly the attention modules whose forward reshapes by the config's head counts.
Modules' own int attributes are traced the same way (named ``@module:attr``,
:attr:`~xtp.planning.probe.FlowGraph.attr_reads`): an attribute the forward only *divides*
before using it as a size (``embed_dim // mp_num``) is not a head count or width to make local.
The size of a tensor's last dimension read off its shape is traced too, naming the tensor's
sources (``#source``, :func:`shape_traced`). Config and attributes are put back after the
probe.
"""

from __future__ import annotations

import torch


class TracedInt(int):
    """An ``int`` that remembers the config attribute names it was computed from."""

    origin: frozenset = frozenset()

    def __new__(cls, value: int, origin=frozenset()):
        obj = super().__new__(cls, value)
        obj.origin = frozenset(origin)
        return obj

    def __deepcopy__(self, memo):
        return TracedInt(int(self), self.origin)

    def __reduce__(self):
        return (TracedInt, (int(self), self.origin))


#: suffix of an origin whose value was divided (``x // n``, ``x % n``): the result is no longer
#: a multiple of the original quantity (``embed_dim // mp_num`` is a group's width)
DIVIDED = "//"


def _keep_origin(op: str):
    base = getattr(int, op)
    divides = op in ("__floordiv__", "__mod__")

    def method(self, other):
        out = base(self, other)
        if isinstance(out, int) and not isinstance(out, bool):
            mine = self.origin
            if divides:
                mine = frozenset(o if o.endswith(DIVIDED) else o + DIVIDED for o in mine)
            return TracedInt(out, mine | getattr(other, "origin", frozenset()))
        return out

    return method


for _op in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__",
            "__rfloordiv__", "__mod__", "__rmod__"):
    setattr(TracedInt, _op, _keep_origin(_op))


def module_origin(module_name: str, attr: str) -> str:
    """The origin name of int attribute ``attr`` of module ``module_name`` (``@path:attr``)."""
    return f"@{module_name}:{attr}"


def origins(obj) -> set[str]:
    """Names behind every :class:`TracedInt` in ``obj`` (nested lists, tuples, slices, dicts)."""
    if isinstance(obj, TracedInt):
        return set(obj.origin)
    if isinstance(obj, slice):
        return origins((obj.start, obj.stop, obj.step))
    if isinstance(obj, dict):
        return origins(tuple(obj.values()))
    if isinstance(obj, (list, tuple)):
        out: set[str] = set()
        for o in obj:
            out |= origins(o)
        return out
    return set()


def instrument_config(config, names) -> list:
    """Replace the int attributes ``names`` of ``config`` by traced ones; returns what
    :func:`restore` needs."""
    saved = []
    cdict = getattr(config, "__dict__", None)
    if isinstance(cdict, dict):
        for k in names:
            v = cdict.get(k)
            if type(v) is int:
                saved.append((cdict, k, v))
                cdict[k] = TracedInt(v, {k})
    return saved


def instrument_modules(model, skip) -> list:
    """Replace every plain int attribute of every module of ``model`` (but those ``skip(module)``
    says to leave) by a traced one named :func:`module_origin`; returns what :func:`restore`
    needs."""
    saved = []
    for name, module in model.named_modules():
        if skip(module):
            continue
        for k, v in list(module.__dict__.items()):
            if type(v) is int:
                saved.append((module.__dict__, k, v))
                module.__dict__[k] = TracedInt(v, {module_origin(name, k)})
    return saved


def restore(saved: list) -> None:
    for d, k, v in saved:
        d[k] = v


def untrace_modules(model) -> None:
    """Plain ints again for traced ints left in modules' attributes (modules the forward built
    while the config was traced: their head counts were computed from traced values)."""
    for module in model.modules():
        for k, v in list(module.__dict__.items()):
            if isinstance(v, TracedInt):
                module.__dict__[k] = int(v)


#: reading a tensor's shape: the sizes remember the tensor's sources (origin ``#source``)
SHAPE = "#"
SHAPE_READS = (torch.Tensor.size, torch.Tensor.shape.__get__)


def shape_traced(out, src: set[str], args: tuple):
    """``out`` (a shape, or one size: ``x.size(d)``) with the size of the *last* dimension of
    ``x = args[0]`` (its features) a :class:`TracedInt` naming ``src``; the other dimensions
    (batch, sequence) stay plain ints: a sequence length equal to some width by chance must not
    look like a width read off the input."""
    if not src:
        return out
    tag = {SHAPE + s for s in src}

    def traced(v):
        return TracedInt(int(v), set(getattr(v, "origin", ())) | tag)

    if isinstance(out, torch.Size):
        return torch.Size([*out[:-1], traced(out[-1])]) if len(out) else out
    dim = args[1] if len(args) > 1 else None
    last = isinstance(dim, int) and dim in (-1, args[0].dim() - 1)
    if last and isinstance(out, int) and not isinstance(out, bool):
        return traced(out)
    return out


def shape_origins(obj) -> set[tuple[int, frozenset]]:
    """(size, sources of the tensors whose shape it was read from) for each size in ``obj``
    read off a tensor's shape."""
    if isinstance(obj, TracedInt):
        src = frozenset(o[len(SHAPE):] for o in obj.origin if o.startswith(SHAPE))
        return {(int(obj), src)} if src else set()
    if isinstance(obj, (list, tuple)):
        return set().union(*(shape_origins(o) for o in obj)) if obj else set()
    return set()
