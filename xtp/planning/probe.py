"""Data-flow probe: which Linear outputs reach which Linear inputs, found by running the model.

The model runs once on a tiny input (on the meta device when its weights are on meta, so it
costs no memory). Every tensor carries the set of *sources* (Linear-like layers, embeddings and
the model input) whose output reached it through ops that are not themselves Linear layers;
a Linear layer's output starts a fresh set. From that we read, for every Linear layer, which
sources feed its input and which consumers its output reaches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

INPUT = "<input>"
OUTPUT = "<output>"
_ATTR = "_xtp_sources"


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


def sources_of(obj) -> set[str]:
    out: set[str] = set()
    for t in _tensors(obj):
        out |= getattr(t, _ATTR, set())
    return out


def _mark(obj, sources: set[str], replace: bool = False) -> None:
    for t in _tensors(obj):
        try:
            if replace:
                setattr(t, _ATTR, set(sources))
            else:
                setattr(t, _ATTR, getattr(t, _ATTR, set()) | sources)
        except (AttributeError, RuntimeError):
            pass


class _FlowMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        src = sources_of(args) | sources_of(kwargs)
        if src:
            _mark(out, src)
        return out


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

    def post_hook(mod, args, kwargs, out):
        _mark(out, {names[mod]}, replace=True)

    def inner_hook(mod, args, kwargs, out):
        name = names[mod]
        shapes = [tuple(p.shape) for p in mod.parameters(recurse=False)]
        for s in sources_of(args) | sources_of(kwargs):
            graph.inner[s][name] = shapes

    for mod in model.modules():
        if is_source(mod):
            handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(mod.register_forward_hook(post_hook, with_kwargs=True))
        elif any(True for _ in mod.parameters(recurse=False)):
            handles.append(mod.register_forward_hook(inner_hook, with_kwargs=True))
    try:
        _mark(inputs, {INPUT})
        with _FlowMode(), torch.no_grad():
            out = model(**inputs)
        for s in sources_of(out):
            graph.consumers[s].add(OUTPUT)
    finally:
        for h in handles:
            h.remove()
    return graph
