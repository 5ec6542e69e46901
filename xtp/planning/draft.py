"""The state of a plan being derived: what was found about the model (modules, weight kinds,
probed data flow, rules, head shape) and what the steps have decided so far (specs, notes,
collectives, attribute updates...). Each planning step reads and extends one :class:`Draft`;
:func:`xtp.planning.derive.derive_plan` runs the steps in order and freezes the result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..errors import PlanError
from . import model_table as mt
from .fused import infer_head_shape
from .probe import FlowGraph
from .rules import glob_rules
from .spec import AttrUpdate, Collective, Layout, ModuleSpec, Ranges, Role, Split, WeightKind
from .trace import run_probe
from .weights import module_spec, plain_forward, weight_kind


def _head_bias_tables(modules: dict[str, nn.Module], kinds: dict[str, WeightKind],
                      heads: tuple[int, int, int] | None, config) -> set[str]:
    """Per-head bias tables (T5 relative attention bias): embeddings with one column per head
    (and not ``vocab_size`` rows)."""
    return {
        n for n, k in kinds.items()
        if k == WeightKind.EMBEDDING and heads and modules[n].weight.shape[1] == heads[0]
        and modules[n].weight.shape[0] != mt.vocab_size(config)
    }


@dataclass
class Draft:
    """One plan in the making for ``model`` at ``tp`` ranks.

    Found at the start: ``modules`` (``named_modules``), ``kinds`` (module -> weight kind, for
    the layers xtp can shard), ``graph`` (the probe's data flow), ``rules`` (module -> (role,
    pattern)), ``heads`` ((num_heads, num_kv_heads, head_dim) or None), ``head_biases``
    (per-head bias tables). Filled by the steps: the rest.
    """

    model: nn.Module
    tp: int
    config: object
    modules: dict[str, nn.Module]
    kinds: dict[str, WeightKind]
    graph: FlowGraph
    rules: dict[str, tuple[Role, str]]
    heads: tuple[int, int, int] | None
    head_biases: set[str]
    specs: dict[str, ModuleSpec] = field(default_factory=dict)
    #: module -> why it stays whole (a rule on it or its partner, an unsafe pair)
    kept_whole: dict[str, str] = field(default_factory=dict)
    attr_updates: list[AttrUpdate] = field(default_factory=list)
    local_configs: list = field(default_factory=list)
    head_sliced: list = field(default_factory=list)
    #: (batch, keyword input shapes) of the second probe (:mod:`.head_kwargs`), once run
    wide_kwargs: tuple | None = None
    partial_grads: list[str] = field(default_factory=list)
    collectives: list[Collective] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: (tower, input name, input shape) of every tower planned on a probe of its own
    tower_inputs: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)

    @classmethod
    def start(cls, model: nn.Module, tp: int, rules: dict[str, str] | None,
              heads: int | None = None, kv_heads: int | None = None) -> Draft:
        """Probe ``model`` and validate ``rules``: a draft with nothing decided yet.

        Head counts come from ``heads``/``kv_heads`` when given, else from the config
        (:func:`~xtp.planning.model_table.head_shape`), else from the views into heads the
        forward makes (:func:`~xtp.planning.fused.infer_head_shape`).

        Raises:
            PlanError: the probe's forward pass cannot run.
            RuleError: a rule names an unknown role or matches no module.
        """
        config = getattr(model, "config", None)
        modules = dict(model.named_modules())
        kinds = {n: k for n, m in modules.items() if (k := weight_kind(m))}
        graph = run_probe(model)
        ruled = glob_rules(rules, list(modules))
        shape = _head_shape(config, graph, heads, kv_heads)
        return cls(model, tp, config, modules, kinds, graph, ruled, shape,
                   _head_bias_tables(modules, kinds, shape, config))

    def is_linear(self, name: str) -> bool:
        """True for a Linear-like layer (nn.Linear or transformers Conv1D) that computes a plain
        product with its weight: the base class's forward, or a forward of its own that does not
        reshape or view the weight (a block-diagonal grouped linear views it per group, so its
        rows do not map to output features one to one: never split)."""
        return (self.kinds.get(name) in (WeightKind.OUT_IN, WeightKind.IN_OUT)
                and (plain_forward(self.modules[name])
                     or f"{name}.weight" not in self.graph.reshaped_params))

    def spec(self, name: str, role: Role, reason: str, split: Split | None = None,
             ranges: Sequence[Ranges] = (), layout: Layout | None = None,
             group: str | None = None) -> ModuleSpec:
        """The spec of module ``name`` (see :func:`xtp.planning.weights.module_spec`)."""
        return module_spec(name, self.modules[name], self.kinds[name], self.tp, role, reason,
                           split, ranges, layout, group)

    def note(self, text: str) -> None:
        """Add a note to the plan (once)."""
        if text not in self.notes:
            self.notes.append(text)


def _head_shape(config, graph, heads: int | None, kv_heads: int | None
                ) -> tuple[int, int, int] | None:
    """(heads, kv heads, head dim): explicit counts first, then the config, then the forward.

    Raises:
        PlanError: explicit counts that do not group, or no head dim to go with them.
    """
    found = mt.head_shape(config) or infer_head_shape(graph)
    if heads is None:
        return found
    kv = kv_heads or heads
    if heads < 1 or kv < 1 or heads % kv:
        raise PlanError(f"heads={heads} query heads cannot be grouped over kv_heads={kv_heads}; "
                        "pass kv_heads that divides heads")
    hidden = mt.config_value(config, "hidden_size") if config is not None else None
    head_dim = (found[2] if found else None) or (hidden // heads if isinstance(hidden, int)
                                                 else None)
    if not head_dim:
        raise PlanError(f"heads={heads} given, but neither the config nor the forward shows "
                        "the head size: the model's forward must view its projections into "
                        "(heads, head_dim)")
    return heads, kv, head_dim
