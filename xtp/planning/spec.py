"""ShardPlan: what every module of a model becomes under tensor parallelism, and why.

The plan is derived from structure (:mod:`xtp.planning.probe`) plus the config's head layout and
the declarative :mod:`xtp.planning.model_table`. It is immutable and per model; ``print(plan)``
shows one row per module, collapsed over repeated layer indices (:mod:`xtp.planning.render`).
Nothing here touches weights.

Roles, split kinds, weight kinds and fused layouts are :class:`str` enums: a member equals,
hashes, prints and formats as its bare value (``"column"``), so plans read back from JSON
(plain strings) compare equal to derived ones.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from .render import render_plan

#: ``(start, stop)`` ranges of one dimension; a rank's shard is their concatenation in order
Ranges = tuple[tuple[int, int], ...]


class _Value(str, Enum):
    """A ``str`` enum whose ``str()`` and ``format()`` are its bare value on every Python."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(str.__str__(self), format_spec)


class Role(_Value):
    """What a module becomes under tensor parallelism."""

    COLUMN = "column"                    # output features split; no collective forward
    ROW = "row"                          # input features split; one all-reduce forward, bias after
    VOCAB_EMBEDDING = "vocab_embedding"  # vocabulary rows split; one all-reduce forward
    LM_HEAD = "lm_head"                  # vocabulary rows split; one all-gather of the logits
    HEAD_EMBEDDING = "head_embedding"    # per-head bias table: columns split by heads
    EXPERTS = "experts"                  # fused 3-D MoE experts: intermediate dim split; all-reduce
    HEAD_PARAMS = "head_params"          # a pair's per-head (per-feature) parameters: split with it
    NORM = "norm"                        # per-token norm inside a pair: split with it; all-reduce
    REPLICATE = "replicate"              # every rank keeps the whole module


SHARDED_ROLES = (Role.COLUMN, Role.ROW, Role.VOCAB_EMBEDDING, Role.LM_HEAD, Role.HEAD_EMBEDDING,
                 Role.EXPERTS, Role.HEAD_PARAMS, Role.NORM)


class Split(_Value):
    """Which features of a module a sharded role splits."""

    OUT = "out"      # output features (or a per-head table's columns)
    IN = "in"        # input features (or the experts' intermediate dimension)
    VOCAB = "vocab"  # an embedding's vocabulary rows


class WeightKind(_Value):
    """How a module stores its weight tensor."""

    OUT_IN = "out_in"                  # nn.Linear: (out_features, in_features)
    IN_OUT = "in_out"                  # transformers Conv1D: (in_features, out_features)
    EMBEDDING = "embedding"            # nn.Embedding: (num_embeddings, embedding_dim)
    EXPERT_WEIGHTS = "expert_weights"  # 3-D expert tensors; per-parameter splits in params
    PARAMS = "params"                  # a module's own parameters; per-parameter splits in params


class Layout(_Value):
    """How a fused projection packs its outputs (see :mod:`xtp.planning.layouts` for the exact
    row order of each)."""

    QKV_CONCAT = "qkv_concat"            # [q heads | k heads | v heads] (Phi-3, GPT-2, Falcon-MQA)
    QKV_INTERLEAVED = "qkv_interleaved"  # per head [q, k, v] (GPT-NeoX, Bloom, Falcon-MHA)
    QKV_GROUPED = "qkv_grouped"          # per KV group [q.., k, v] (Falcon new decoder arch.)
    GATE_UP_CONCAT = "gate_up_concat"    # [gate | up] (Phi-3 gate_up_proj)


def split_dim(kind: WeightKind, split: Split) -> int:
    """The dimension of a weight stored as ``kind`` that ``split`` cuts (a 2-D weight)."""
    if kind == WeightKind.EMBEDDING:
        return 0 if split == Split.VOCAB else 1
    if kind == WeightKind.OUT_IN:
        return 0 if split == Split.OUT else 1
    return 1 if split == Split.OUT else 0


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

    ``ranges[r]``: the ranges of the split dimension rank ``r`` owns (see
    :mod:`xtp.planning.layouts`).
    ``split``: which features are split (:class:`Split`), None when replicated.
    ``full``: the full extent of the split dimension.
    ``padded``: a column whose output keeps its full width (its own features at their places,
    zeros elsewhere) or a row that reads only its own features of a full-width input: a pair
    whose forward reshapes its activations to a width read off its input.
    """

    name: str
    role: Role
    kind: WeightKind
    reason: str
    split: Split | None = None
    full: int = 0
    ranges: tuple[Ranges, ...] = ()
    layout: Layout | None = None
    group: str | None = None
    weight_shape: tuple[int, ...] = ()
    nbytes: tuple[int, ...] = ()
    params: tuple[ParamSplit, ...] = ()
    padded: bool = False

    def param_splits(self) -> tuple[ParamSplit, ...]:
        """How each of the module's own parameters is split (absent: replicated whole)."""
        if self.params or not self.is_sharded:
            return self.params
        out = [ParamSplit("weight", split_dim(self.kind, self.split), self.ranges)]
        if self.kind != WeightKind.EMBEDDING and self.split == Split.OUT:
            out.append(ParamSplit("bias", 0, self.ranges))
        return tuple(out)

    @property
    def is_sharded(self) -> bool:
        """True when the role splits the module (every role but :attr:`Role.REPLICATE`)."""
        return self.role in SHARDED_ROLES

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
    #: encoder towers planned from a probe of their own (:mod:`xtp.planning.towers`): (module,
    #: input name, input shape) of each, for the shard-time check to run them too
    tower_inputs: tuple[tuple[str, str, tuple[int, ...]], ...] = ()
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._index.update({s.name: s for s in self.specs})

    def spec(self, name: str) -> ModuleSpec | None:
        return self._index.get(name)

    def sharded(self) -> list[ModuleSpec]:
        return [s for s in self.specs if s.is_sharded]

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
                 if s.is_sharded else None}
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


