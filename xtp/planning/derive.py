"""Deriving a :class:`~xtp.planning.spec.ShardPlan` from a model's structure, step by step.

1. Probe (:mod:`xtp.planning.trace`): one forward on fake tensors tells which Linear outputs
   reach which Linear inputs; user rules are checked against the module paths
   (:mod:`xtp.planning.rules`).
2. Pairs and 3. partitions (:mod:`xtp.planning.pairs`, :mod:`xtp.planning.heads`): a Linear
   fed only by Linears that feed only it is a row layer, those its columns; they share a
   head-granular or even partition of the inner dimension. Encoder towers the text forward
   does not reach (audio, vision) get the same, from a probe of their own
   (:mod:`xtp.planning.towers`).
4. Embeddings (:mod:`xtp.planning.embeddings`): the vocab-parallel input embedding and the
   parallel LM head.
5. Experts (:mod:`xtp.planning.experts`): fused 3-D MoE experts split their intermediate size;
   expert containers the forward shows multiplying 3-D parameters batch-wise likewise
   (:mod:`xtp.planning.param_experts`).
6. Tied weights (:mod:`xtp.planning.ties`) are sharded identically or not at all.
7. Everything else is replicated, with the reason; the plan is compared with transformers'
   ``base_model_tp_plan`` (:mod:`xtp.planning.tp_plan_check`).
"""

from __future__ import annotations

from torch import nn

from .draft import Draft
from .embeddings import plan_embeddings
from .experts import plan_experts
from .head_params import plan_output_params
from .pairs import plan_pairs
from .param_experts import plan_param_experts
from .spec import Role, ShardPlan
from .ties import check_ties, count_tied_once
from .towers import plan_towers
from .tp_plan_check import compare_tp_plan
from .weights import nbytes


def _replicate_rest(draft: Draft) -> None:
    """Every shardable layer no step took stays whole, with the reason."""
    for name in draft.kinds:
        if name not in draft.specs:
            role, pattern = draft.rules.get(name, (None, None))
            reason = (f"rule {pattern!r}" if pattern else draft.kept_whole.get(
                name, "structure: its output joins the residual stream (not paired)"))
            draft.specs[name] = draft.spec(name, Role.REPLICATE, reason)


def _drop_orphan_norms(draft: Draft) -> None:
    """A norm split with its pair (:attr:`Role.NORM`) whose row a later step kept whole stays
    whole too: its activations are full again."""
    for name, spec in list(draft.specs.items()):
        row = draft.specs.get(spec.group) if spec.role == Role.NORM else None
        if spec.role == Role.NORM and (row is None or row.role != Role.ROW):
            del draft.specs[name]


def _freeze(draft: Draft) -> ShardPlan:
    """The immutable plan: specs in module order, collectives of sharded modules only, and the
    bytes of every parameter and buffer no spec covers."""
    collectives = [c for c in draft.collectives if draft.specs.get(c.source)
                   and draft.specs[c.source].is_sharded]
    order = {n: i for i, n in enumerate(draft.modules)}
    specs = tuple(count_tied_once(draft, sorted(draft.specs.values(),
                                                key=lambda s: order[s.name])))
    covered = {id(p) for s in specs for p in draft.modules[s.name].parameters(recurse=False)}
    replicated = sum(nbytes(p) for p in {id(p): p for p in draft.model.parameters()}.values()
                     if id(p) not in covered)
    replicated += sum(nbytes(b) for b in draft.model.buffers())
    return ShardPlan(
        tp_size=draft.tp, model_type=getattr(draft.config, "model_type", None), specs=specs,
        attr_updates=tuple(draft.attr_updates), local_configs=tuple(draft.local_configs),
        head_sliced_kwargs=tuple(draft.head_sliced),
        partial_grad_params=tuple(draft.partial_grads),
        collectives=tuple(collectives), replicated_bytes=replicated,
        notes=tuple(draft.notes),
        tp_plan_differences=tuple(compare_tp_plan(draft.model, draft.config, specs)),
        head_shape=draft.heads, tower_inputs=tuple(draft.tower_inputs),
    )


def derive_plan(model: nn.Module, tp_size: int, rules: dict[str, str] | None = None, *,
                heads: int | None = None, kv_heads: int | None = None) -> ShardPlan:
    """Plan ``model`` for ``tp_size`` ranks. See the module docstring for the steps.

    ``heads``/``kv_heads``: the attention head counts, for a model whose config does not hold
    them and whose forward does not show them (default: config, then forward).

    Raises:
        PlanError: the probe cannot run, or a pair cannot be split over ``tp_size`` ranks.
        RuleError: a rule names an unknown role or matches no module.
        TPSizeError: the attention heads cannot be spread over ``tp_size`` ranks.
        UnclassifiedModuleError: a column layer of unknown fused layout.
    """
    draft = Draft.start(model, tp_size, rules, heads, kv_heads)
    plan_pairs(draft)
    plan_towers(draft)
    plan_embeddings(draft)
    plan_experts(draft)
    plan_param_experts(draft)
    plan_output_params(draft)
    check_ties(draft)
    _replicate_rest(draft)
    _drop_orphan_norms(draft)
    return _freeze(draft)
