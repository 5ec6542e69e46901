"""Data-flow probe: which Linear outputs reach which Linear inputs, found by running the model.

The model runs once on a tiny input (on the meta device when its weights are on meta, so it
costs no memory). Every tensor carries the set of *sources* (Linear-like layers, embeddings and
the model input) whose output reached it through ops that are not themselves Linear layers;
a Linear layer's output starts a fresh set. From that we read, for every Linear layer, which
sources feed its input and which consumers its output reaches.

Besides, every *layout op* (view, reshape, split, chunk, transpose, indexing, ...) applied to a
source's output, or to a tensor made from it by layout ops alone, is recorded as a
:class:`LayoutNode`: replayed on an index tensor (:mod:`xtp.planning.fused`), those ops say
where each output feature of a fused projection ends up (which of q/k/v or gate/up, which head).

3-D parameters multiplied batch-wise (``torch.bmm(x, W)`` / ``x @ W`` with ``W`` of shape
``(experts, in, out)``: expert containers outside transformers' experts interface) are tracked
apart, by parameter name: which such product's output reaches which such product's input, the
layout ops on each product's output, and which product a module returns (by layout ops alone).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .reductions import NORMS, REDUCTIONS, SOFTMAXES, reduced_sizes
from .reductions import ints_in as _ints
from .size_roles import record_roles, tag_factory
from .traced import SHAPE as _SHAPE
from .traced import SHAPE_READS as _SHAPE_READS
from .traced import origins
from .traced import shape_origins as _shape_origins
from .traced import shape_traced as _shape_traced

INPUT = "<input>"
OUTPUT = "<output>"
_ATTR = "_xtp_sources"
_NODE = "_xtp_layout_node"
_PSRC = "_xtp_param_sources"
_PARAM = "_xtp_params"
KWARG = "kw:"  #: prefix of a module's keyword input followed like a parameter

_T = torch.Tensor
#: ops that move or select features without computing on them
LAYOUT_OPS = frozenset({
    _T.view, _T.reshape, _T.split, _T.split_with_sizes, _T.chunk, _T.tensor_split, _T.unbind,
    _T.transpose, _T.permute, _T.__getitem__, _T.unflatten, _T.flatten, _T.narrow, _T.select,
    _T.contiguous, _T.unsqueeze, _T.squeeze, _T.movedim, _T.swapaxes,
    torch.split, torch.chunk, torch.tensor_split, torch.unbind, torch.transpose, torch.permute,
    torch.reshape, torch.narrow, torch.select, torch.unsqueeze, torch.squeeze, torch.flatten,
    torch.movedim, torch.swapaxes,
})


#: batched products ``op(x, W)``: with ``W`` a 3-D parameter, a product over experts
BATCHED_MATMUL = frozenset({torch.bmm, torch.matmul, _T.bmm, _T.matmul, _T.__matmul__})
#: layout ops whose arguments from this position on are sizes (not dimensions)
SIZE_ARGS = {_T.view: 1, _T.reshape: 1, _T.split: 1, _T.split_with_sizes: 1, _T.unflatten: 2,
             torch.split: 1, torch.reshape: 1}


@dataclass(frozen=True)
class Ref:
    """A placeholder in a recorded op's arguments: node ``node`` of the same source, or the
    source's own output when ``node`` is -1."""

    node: int


@dataclass(frozen=True)
class LayoutNode:
    """One layout op on a source's output: ``func(*args, **kwargs)`` with :class:`Ref` for the
    tensors; ``item`` picks one element when the op returns several (split, chunk, unbind)."""

    func: object
    args: tuple
    kwargs: dict
    item: int | None = None


@dataclass
class FlowGraph:
    """The result of one probe run (module names are ``named_modules`` paths).

    producers[m]: sources found in the input of Linear-like module ``m``.
    consumers[s]: Linear-like modules (or ``OUTPUT``) whose input contained source ``s``.
    inner[s]: non-Linear modules with parameters that saw ``s`` (name -> parameter shapes).
    order: Linear-like and embedding modules in first-call order.
    """

    producers: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    consumers: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    inner: dict[str, dict[str, list[tuple[int, ...]]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    order: list[str] = field(default_factory=list)
    #: layout ops applied to each source's output: source -> nodes (see LayoutNode)
    layout_nodes: dict[str, list[LayoutNode]] = field(default_factory=lambda: defaultdict(list))
    #: sizes (view/reshape shapes, split sizes) layout ops used on activations of each source
    layout_sizes: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    #: config attributes (traced during the probe) behind the sizes and indices layout ops
    #: used on activations of each source
    config_reads: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    #: modules' int attributes (``@module:attr``, ``//`` appended when divided first) behind
    #: the sizes and indices layout ops used on activations of each source
    attr_reads: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    #: of those, by role ("count", "width", "repeat"): source -> role -> origins (.size_roles)
    roles: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(set)))
    #: parameters the forward reshapes, splits or views (not only transposes): a Linear
    #: subclass doing so to its weight is no plain linear (a block-diagonal grouped linear)
    reshaped_params: set[str] = field(default_factory=set)
    #: shape of each source's output on its first call
    out_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: 3-D parameters multiplied batch-wise as the right operand (see the module docstring):
    #: which products' outputs reach each one's input, whose inputs each one's output reaches,
    #: and each product's output shape (its layout ops are in ``layout_nodes`` under the
    #: parameter's name)
    param_producers: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    param_consumers: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: module -> (parameter, layout node) when the module returns that parameter's product
    #: after layout ops alone (node -1: the product itself)
    module_out_nodes: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: parameter -> the sources of the activations it first meets in an op (through ops on
    #: the parameter alone: ``sinks.reshape(1, -1, 1, 1)`` then ``cat`` with attention scores)
    param_uses: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    #: sizes layout ops used on activations of each source that the forward read off the
    #: shape of a tensor: (size, the sources of that tensor)
    shape_sizes: dict[str, set[tuple[int, frozenset]]] = field(
        default_factory=lambda: defaultdict(set))
    #: sizes of the dimensions reductions and norms ran over on activations of each source
    reduced_sizes: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    #: the same sizes, each with the innermost module holding parameters (a source or not)
    #: whose forward ran the reduction ("" when none): (size, module)
    reduced_in: dict[str, set[tuple[int, str]]] = field(default_factory=lambda: defaultdict(set))
    #: innermost last: the modules with parameters running now (probe-internal)
    scope: list[str] = field(default_factory=list)
    #: source modules whose weight an op used on activations outside their calls (``h @ E.T``)
    used_outside: set[str] = field(default_factory=set)
    #: tensors given to a module as keyword inputs that are neither activations nor made from
    #: parameters (masks, ALiBi biases): ``KWARG + "module:key"`` -> shape at the first call;
    #: followed like parameters (their first meeting with activations is in ``param_uses``)
    kwarg_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    running: list[str] = field(default_factory=list)  #: source modules running now (internal)


def _tensors(obj) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)
    elif hasattr(obj, "to_tuple"):  # transformers ModelOutput
        yield from _tensors(obj.to_tuple())


def sources_of(obj, attr: str = _ATTR) -> set[str]:
    out: set[str] = set()
    for t in _tensors(obj):
        out |= getattr(t, attr, set())
    return out


def _mark(obj, sources: set[str], replace: bool = False, attr: str = _ATTR) -> None:
    for t in _tensors(obj):
        try:
            if replace:
                setattr(t, attr, set(sources))
            else:
                setattr(t, attr, getattr(t, attr, set()) | sources)
        except (AttributeError, RuntimeError):
            pass


def _refs(obj, owner: list):
    """``obj`` with every tensor replaced by its :class:`Ref`; ``owner`` collects the tensors'
    sources (``None`` for a tensor not made by layout ops from a source's output)."""
    if isinstance(obj, torch.Tensor):
        node = getattr(obj, _NODE, None)
        owner.append(node[0] if node else None)
        return Ref(node[1]) if node else None
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return type(obj)(_refs(o, owner) for o in obj)
    return obj


def _record_layout(graph: FlowGraph, func, args, kwargs, out) -> None:
    """Record ``func`` when it is a layout op on tensors of exactly one source's lineage."""
    owner: list = []
    r_args, r_kwargs = _refs(args, owner), {k: _refs(v, owner) for k, v in kwargs.items()}
    if not owner or len(set(owner)) != 1 or owner[0] is None:
        return
    nodes = graph.layout_nodes[owner[0]]
    outs = out if isinstance(out, (list, tuple)) else [out]
    for i, t in enumerate(outs):
        if isinstance(t, torch.Tensor):
            nodes.append(LayoutNode(func, r_args, r_kwargs,
                                    i if isinstance(out, (list, tuple)) else None))
            try:
                setattr(t, _NODE, (owner[0], len(nodes) - 1))
            except (AttributeError, RuntimeError):
                pass


#: layout ops that keep a weight's rows as rows (a transpose is how a linear reads its weight)
_ORDER_ONLY = frozenset({_T.transpose, _T.permute, _T.contiguous, _T.movedim, _T.swapaxes,
                         torch.transpose, torch.permute, torch.movedim, torch.swapaxes})


class _FlowMode(TorchFunctionMode):
    def __init__(self, graph: FlowGraph | None = None, params: dict | None = None,
                 owners: dict | None = None) -> None:
        super().__init__()
        self.graph, self.params, self.owners = graph, params or {}, owners or {}

    def _track_params(self, args, kwargs, out, src: set[str]) -> None:
        """Parameters (and tensors made from them alone) meeting activations: record the
        activations' sources; else pass the parameters on to the op's outputs."""
        found: set[str] = set()
        for t in _tensors((args, kwargs)):
            found |= getattr(t, _PARAM, set())
            if id(t) in self.params:
                found.add(self.params[id(t)])
        if not found:
            return
        if src:
            for p in found:
                self.graph.param_uses[p] |= src
                held = {m for m, ps in self.owners.items() if p in ps}
                self.graph.used_outside |= set() if held & set(self.graph.running) else held
            return
        for t in _tensors(out):
            try:
                setattr(t, _PARAM, found)
            except (AttributeError, RuntimeError):
                pass

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.graph is not None and func in _SHAPE_READS and args:
            return _shape_traced(out, sources_of(args[0]), args)
        if (self.graph is not None and args and func in LAYOUT_OPS and func not in _ORDER_ONLY
                and id(args[0]) in self.params):
            self.graph.reshaped_params.add(self.params[id(args[0])])
        self._track_param_products(func, args, kwargs, out)
        src = sources_of(args) | sources_of(kwargs)
        if self.graph is not None:
            tag_factory(func, args, kwargs, out, _PARAM)
            self._track_params(args, kwargs, out, src)
        if src:
            _mark(out, src)
            if self.graph is not None:
                record_roles(self.graph, func, args, kwargs, src)
            if self.graph is not None and (func in REDUCTIONS or func in NORMS) and (
                    func not in SOFTMAXES or len(src) == 1):
                sizes = reduced_sizes(func, args, kwargs)
                where = self.graph.scope[-1] if self.graph.scope else ""
                for s in src:
                    self.graph.reduced_sizes[s] |= sizes
                    self.graph.reduced_in[s] |= {(n, where) for n in sizes}
            if self.graph is not None and func in LAYOUT_OPS:
                _record_layout(self.graph, func, args, kwargs, out)
                read = origins(args[1:]) | origins(kwargs)
                attrs = {o for o in read if o.startswith("@")}
                shapes = {o for o in read if o.startswith(_SHAPE)}
                for s in src if read else ():
                    if read - attrs - shapes:
                        self.graph.config_reads[s] |= read - attrs - shapes
                    self.graph.attr_reads[s] |= attrs
                if func in SIZE_ARGS:
                    sizes = _ints(args[SIZE_ARGS[func]:]) | _ints(kwargs.get("split_size"))
                    from_shapes = _shape_origins(args[SIZE_ARGS[func]:])
                    for s in src:
                        self.graph.layout_sizes[s] |= sizes
                        self.graph.shape_sizes[s] |= from_shapes
        return out

    def _track_param_products(self, func, args, kwargs, out) -> None:
        """Follow batch-wise products with 3-D parameters (see the module docstring)."""
        if self.graph is None:
            return
        psrc = sources_of(args, _PSRC) | sources_of(kwargs, _PSRC)
        weight = args[1] if func in BATCHED_MATMUL and len(args) > 1 else None
        name = self.params.get(id(weight)) if isinstance(weight, torch.Tensor) else None
        if name is None or weight.dim() != 3 or not isinstance(out, torch.Tensor):
            if psrc:
                _mark(out, psrc, attr=_PSRC)
            return
        g = self.graph
        g.param_producers[name] |= psrc
        for s in psrc:
            g.param_consumers[s].add(name)
        _mark(out, {name}, replace=True, attr=_PSRC)
        if name not in g.param_shapes:
            g.param_shapes[name] = tuple(out.shape)
            try:
                setattr(out, _NODE, (name, -1))
            except (AttributeError, RuntimeError):
                pass


def probe(
    model: nn.Module,
    inputs: dict,
    is_source: callable,
) -> FlowGraph:
    """Run ``model(**inputs)`` once and record the data flow between source modules.

    ``is_source(module) -> bool`` says which modules start a fresh source set (Linear-like
    layers and embeddings).
    """
    graph = FlowGraph()
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def pre_hook(mod, args, kwargs):
        name = names[mod]
        src = sources_of(args) | sources_of(kwargs)
        graph.producers[name] |= src
        for s in src:
            graph.consumers[s].add(name)
        if name not in graph.order:
            graph.order.append(name)
        graph.running.append(name)
        graph.scope.append(name)

    def post_hook(mod, args, kwargs, out):
        name = names[mod]
        graph.running.remove(name)
        if graph.scope and graph.scope[-1] == name:
            graph.scope.pop()
        _mark(out, {name}, replace=True)
        if isinstance(out, torch.Tensor) and name not in graph.out_shapes:
            graph.out_shapes[name] = tuple(out.shape)
            try:
                setattr(out, _NODE, (name, -1))
            except (AttributeError, RuntimeError):
                pass

    def kwarg_hook(mod, args, kwargs):
        for key, t in kwargs.items():
            if (isinstance(t, torch.Tensor) and not sources_of(t)
                    and not any(not n.startswith(KWARG) for n in getattr(t, _PARAM, ()))):
                tag = f"{KWARG}{names[mod]}:{key}"
                graph.kwarg_shapes.setdefault(tag, tuple(t.shape))
                _mark(t, {tag}, attr=_PARAM)

    def inner_pre_hook(mod, args, kwargs):
        graph.scope.append(names[mod])

    def inner_hook(mod, args, kwargs, out):
        name = names[mod]
        if graph.scope and graph.scope[-1] == name:
            graph.scope.pop()
        shapes = [tuple(p.shape) for p in mod.parameters(recurse=False)]
        for s in sources_of(args) | sources_of(kwargs):
            graph.inner[s][name] = shapes
        node = getattr(out, _NODE, None) if isinstance(out, torch.Tensor) else None
        if node is not None and node[0] in graph.param_shapes:
            graph.module_out_nodes.setdefault(name, node)

    for mod in model.modules():
        if is_source(mod):
            handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(mod.register_forward_hook(post_hook, with_kwargs=True))
        elif any(True for _ in mod.parameters(recurse=False)):
            handles.append(mod.register_forward_pre_hook(inner_pre_hook, with_kwargs=True))
            handles.append(mod.register_forward_hook(inner_hook, with_kwargs=True))
        if not is_source(mod):
            handles.append(mod.register_forward_pre_hook(kwarg_hook, with_kwargs=True))
    try:
        _mark(inputs, {INPUT})
        params = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        owners = {names[m]: {params[id(p)] for p in m.parameters(recurse=False)}  # own weights
                  for m in model.modules() if is_source(m)}
        with _FlowMode(graph, params, owners), torch.no_grad():
            out = model(**inputs)
        for s in sources_of(out):
            graph.consumers[s].add(OUTPUT)
    finally:
        for h in handles:
            h.remove()
    return graph
