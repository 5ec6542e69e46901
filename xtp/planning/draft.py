"""The state of a plan being derived: what was found about the model (modules, weight kinds,
probed data flow, rules, head shape) and what the steps have decided so far (specs, notes,
collectives, attribute updates...). Each planning step reads and extends one :class:`Draft`;
:func:`xtp.planning.derive.derive_plan` runs the steps in order and freezes the result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from . import model_table as mt
from .probe import FlowGraph
from .rules import glob_rules
from .spec import AttrUpdate, Collective, Layout, ModuleSpec, Ranges, Role, Split, WeightKind
from .trace import run_probe
from .weights import module_spec, weight_kind


def _head_bias_tables(modules: dict[str, nn.Module], kinds: dict[str, WeightKind],
                      heads: tuple[int, int, int] | None, config) -> set[str]:
    """Per-head bias tables (T5 relative attention bias): embeddings with one column per head
    (and not ``vocab_size`` rows)."""
    return {
        n for n, k in kinds.items()
        if k == WeightKind.EMBEDDING and heads and modules[n].weight.shape[1] == heads[0]
        and modules[n].weight.shape[0] != mt.config_value(config, "vocab_size")
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
    partial_grads: list[str] = field(default_factory=list)
    collectives: list[Collective] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, model: nn.Module, tp: int, rules: dict[str, str] | None) -> Draft:
        """Probe ``model`` and validate ``rules``: a draft with nothing decided yet.

        Raises:
            PlanError: the probe's forward pass cannot run.
            RuleError: a rule names an unknown role or matches no module.
        """
        config = getattr(model, "config", None)
        modules = dict(model.named_modules())
        kinds = {n: k for n, m in modules.items() if (k := weight_kind(m))}
        graph = run_probe(model)
        ruled = glob_rules(rules, list(modules))
        heads = mt.head_shape(config)
        return cls(model, tp, config, modules, kinds, graph, ruled, heads,
                   _head_bias_tables(modules, kinds, heads, config))

    def is_linear(self, name: str) -> bool:
        """True for a Linear-like layer (nn.Linear or transformers Conv1D)."""
        return self.kinds.get(name) in (WeightKind.OUT_IN, WeightKind.IN_OUT)

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
