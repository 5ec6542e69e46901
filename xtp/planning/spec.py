"""ShardPlan: what every module of a model becomes under tensor parallelism, and why.

The plan is derived from structure (:mod:`xtp.probe`) plus the config's head layout and the
declarative :mod:`xtp.model_table`. It is immutable and per model; ``print(plan)`` shows one
row per module, collapsed over repeated layer indices. Nothing here touches weights.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

# Roles
COLUMN = "column"            # output features split; no collective forward
ROW = "row"                  # input features split; one all-reduce forward, bias after it
VOCAB_EMBEDDING = "vocab_embedding"  # vocabulary rows split; one all-reduce forward
LM_HEAD = "lm_head"          # vocabulary rows split; one all-gather of the logits
HEAD_EMBEDDING = "head_embedding"  # per-head bias table: columns split by heads
EXPERTS = "experts"          # fused 3-D MoE experts: intermediate dim split; one all-reduce
REPLICATE = "replicate"      # every rank keeps the whole module

SHARDED_ROLES = (COLUMN, ROW, VOCAB_EMBEDDING, LM_HEAD, HEAD_EMBEDDING, EXPERTS)

#: weight tensor layouts, by how a module stores its weight
OUT_IN = "out_in"            # nn.Linear: (out_features, in_features)
IN_OUT = "in_out"            # transformers Conv1D: (in_features, out_features)
EMBEDDING = "embedding"      # nn.Embedding: (num_embeddings, embedding_dim)
EXPERT_WEIGHTS = "expert_weights"  # 3-D expert tensors; per-parameter splits in ModuleSpec.params

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ParamSplit:
    """One parameter's split: ``ranges[r]`` along ``dim`` for rank ``r``; ``zero_off_rank0``:
    ranks other than 0 hold zeros (a bias that a following all-reduce would add ``tp`` times)."""

    param: str
    dim: int
    ranges: tuple[Ranges, ...] = ()
    zero_off_rank0: bool = False


@dataclass(frozen=True)
class ModuleSpec:
    """How one module is sharded.

    ``ranges[r]``: the ranges of the split dimension rank ``r`` owns (see xtp.layouts).
    ``split``: "out" (output features / vocabulary rows) or "in" (input features) or None.
    ``full``: the full extent of the split dimension.
    """

    name: str
    role: str
    kind: str
    reason: str
    split: str | None = None
    full: int = 0
    ranges: tuple[Ranges, ...] = ()
    layout: str | None = None
    group: str | None = None
    weight_shape: tuple[int, ...] = ()
    nbytes: tuple[int, ...] = ()
    params: tuple[ParamSplit, ...] = ()

    def param_splits(self) -> tuple[ParamSplit, ...]:
        """How each of the module's own parameters is split (absent: replicated whole)."""
        if self.params or self.role not in SHARDED_ROLES:
            return self.params
        if self.kind == EMBEDDING:
            return (ParamSplit("weight", 0 if self.split == "vocab" else 1, self.ranges),)
        if self.kind == OUT_IN:
            dim = 0 if self.split == "out" else 1
        else:
            dim = 1 if self.split == "out" else 0
        out = [ParamSplit("weight", dim, self.ranges)]
        if self.split == "out":
            out.append(ParamSplit("bias", 0, self.ranges))
        return tuple(out)

    def local_extent(self, rank: int) -> int:
        return sum(b - a for a, b in self.ranges[rank]) if self.ranges else self.full


@dataclass(frozen=True)
class AttrUpdate:
    """Set ``module.attr`` to ``values[rank]`` on each rank (head counts, widths)."""

    module: str
    attr: str
    full: object
    values: tuple


@dataclass(frozen=True)
class Collective:
    """One kind of collective a forward pass issues: ``count`` calls of ``op`` on tensors of
    ``width`` elements per token (shape ``(..., width)``), issued by module ``source``."""

    op: str
    source: str
    width: int


@dataclass(frozen=True)
class ShardPlan:
    """The complete, immutable plan for one model at one ``tp_size``."""

    tp_size: int
    model_type: str | None
    specs: tuple[ModuleSpec, ...]
    attr_updates: tuple[AttrUpdate, ...] = ()
    local_configs: tuple[tuple[str, tuple[tuple[str, tuple], ...]], ...] = ()
    #: (attention module, kwarg, layout, per-rank (first head, stop head), num_heads)
    head_sliced_kwargs: tuple[tuple[str, str, str, tuple[tuple[int, int], ...], int], ...] = ()
    collectives: tuple[Collective, ...] = ()
    replicated_bytes: int = 0
    notes: tuple[str, ...] = ()
    tp_plan_differences: tuple[str, ...] = ()
    head_shape: tuple[int, int, int] | None = None
    #: replicated parameters that see sharded activations (e.g. per-head q/k norms): each rank
    #: computes only part of their gradient, so it is summed over the TP group in backward
    partial_grad_params: tuple[str, ...] = ()
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._index.update({s.name: s for s in self.specs})

    def spec(self, name: str) -> ModuleSpec | None:
        return self._index.get(name)

    def sharded(self) -> list[ModuleSpec]:
        return [s for s in self.specs if s.role in SHARDED_ROLES]

    def bytes_per_rank(self, rank: int = 0) -> int:
        """Parameter bytes rank ``rank`` holds (its slices plus every replicated tensor)."""
        return self.replicated_bytes + sum(s.nbytes[rank] for s in self.specs if s.nbytes)

    def collective_counts(self) -> Counter:
        """``Counter`` of op -> calls per forward pass (0 everywhere at tp 1)."""
        if self.tp_size == 1:
            return Counter()
        return Counter(c.op for c in self.collectives)

    def to_dict(self) -> dict:
        return {
            "tp_size": self.tp_size,
            "model_type": self.model_type,
            "head_shape": self.head_shape,
            "modules": [
                {"name": s.name, "role": s.role, "kind": s.kind, "split": s.split,
                 "layout": s.layout, "group": s.group, "reason": s.reason,
                 "local_extent": [s.local_extent(r) for r in range(self.tp_size)]
                 if s.role in SHARDED_ROLES else None}
                for s in self.specs
            ],
            "attr_updates": [
                {"module": u.module, "attr": u.attr, "full": u.full, "values": list(u.values)}
                for u in self.attr_updates
            ],
            "bytes_per_rank": [self.bytes_per_rank(r) for r in range(self.tp_size)],
            "collectives_per_forward": dict(self.collective_counts()),
            "notes": list(self.notes),
            "tp_plan_differences": list(self.tp_plan_differences),
        }

    def __str__(self) -> str:
        return render_plan(self)


_LAYER_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def collapse(name: str) -> str:
    """``model.layers.11.mlp`` -> ``model.layers.*.mlp``."""
    return _LAYER_INDEX.sub(".*", name)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def render_plan(plan: ShardPlan) -> str:
    rows: dict[tuple, int] = defaultdict(int)
    first: dict[tuple, ModuleSpec] = {}
    for s in plan.specs:
        key = (collapse(s.name), s.role, s.layout, s.split,
               tuple(s.local_extent(r) for r in range(plan.tp_size)) if s.role in SHARDED_ROLES
               else None, s.reason)
        rows[key] += 1
        first.setdefault(key, s)
    head = f"ShardPlan: tp_size={plan.tp_size}, model_type={plan.model_type}"
    if plan.head_shape:
        h, k, d = plan.head_shape
        head += f", heads={h}, kv_heads={k}, head_dim={d}"
    lines = [head, ""]
    w = max([len(k[0]) for k in rows] + [6])
    lines.append(f"{'module':<{w}}  {'n':>3}  {'role':<15} {'split':<5} {'per rank':<16} reason")
    for key, n in rows.items():
        name, role, layout, split, extents, reason = key
        role_s = role + (f"[{layout}]" if layout else "")
        ext = "/".join(map(str, extents)) if extents else "-"
        lines.append(f"{name:<{w}}  {n:>3}  {role_s:<15} {split or '-':<5} {ext:<16} {reason}")
    if plan.attr_updates:
        lines += ["", "attribute updates (per rank):"]
        seen = set()
        for u in plan.attr_updates:
            key = (collapse(u.module), u.attr, u.values)
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"  {collapse(u.module)}.{u.attr}: {u.full} -> "
                         f"{'/'.join(map(str, u.values))}")
    lines += ["", "bytes per rank: " + ", ".join(
        f"rank {r}: {_fmt_bytes(plan.bytes_per_rank(r))}" for r in range(plan.tp_size))]
    counts = plan.collective_counts()
    lines.append("collectives per forward: " + (
        ", ".join(f"{n} x {op}" for op, n in sorted(counts.items())) or "none"))
    for note in plan.notes:
        lines.append(f"note: {note}")
    for diff in plan.tp_plan_differences:
        lines.append(f"differs from transformers' tp_plan: {diff}")
    return "\n".join(lines)
