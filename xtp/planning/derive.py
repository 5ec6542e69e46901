"""Deriving a :class:`~xtp.plan.ShardPlan` from a model's structure.

1. Probe (xtp.probe): one forward on fake tensors tells which Linear outputs reach which
   Linear inputs.
2. Pairs: a Linear ``R`` whose input comes only from Linears ``S`` that feed nothing but ``R``
   is a row-parallel layer, and ``S`` its column-parallel partners; the pair shares one
   partition of the inner dimension. A layer cannot be both a column and a row (the outer pair
   wins: a low-rank projection in front of a column layer stays replicated). A pair whose inner
   activations pass through a module with a parameter as wide as the inner dimension (a norm
   over all heads) is not sharded: that module would need every head.
3. Partitions: head-granular when the inner width is ``num_heads x head_dim`` (from the
   config), else an even split. Fused layers get their layout from xtp.model_table.
4. Embeddings: the input embedding with ``vocab_size`` rows is vocab-parallel; the Linear that
   produces the model output with ``vocab_size`` features is the parallel LM head.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import inspect
from collections import defaultdict

import torch
from torch import nn

from ..errors import PlanError, RuleError, UnclassifiedModuleError
from . import model_table as mt
from .layouts import fused_ranges, fused_width, kv_ranges, q_ranges, ranges_len
from .partition import HeadPartition, Partition, partition_heads, split_aligned, split_even
from .probe import INPUT, OUTPUT, FlowGraph, probe
from .spec import (
    COLUMN,
    EMBEDDING,
    EXPERT_WEIGHTS,
    EXPERTS,
    HEAD_EMBEDDING,
    IN_OUT,
    LM_HEAD,
    OUT_IN,
    REPLICATE,
    ROW,
    SHARDED_ROLES,
    VOCAB_EMBEDDING,
    AttrUpdate,
    Collective,
    ModuleSpec,
    ParamSplit,
    ShardPlan,
    collapse,
)

RULE_ROLES = (REPLICATE,)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def weight_kind(module: nn.Module) -> str | None:
    """How ``module`` stores its weight (OUT_IN, IN_OUT, EMBEDDING) or None if not a layer
    xtp can shard. Keyed by class, never by name."""
    if isinstance(module, nn.Linear):
        return OUT_IN
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return IN_OUT
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    return None


def in_out(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like module."""
    w = module.weight
    return (w.shape[1], w.shape[0]) if weight_kind(module) == OUT_IN else (w.shape[0], w.shape[1])


def _probe_inputs(model: nn.Module, device: torch.device) -> dict:
    ids = torch.zeros((1, 4), dtype=torch.long, device=device)
    inputs = {"input_ids": ids}
    config = getattr(model, "config", None)
    params = inspect.signature(model.forward).parameters
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = ids.clone()
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


def _snapshot_tensor_state(model: nn.Module) -> list:
    """Every module's buffers and plain tensor attributes (a forward may replace them, e.g.
    rotary embeddings that switch frequency tables by sequence length)."""
    return [(m, dict(m._buffers),
             {k: v for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)})
            for m in model.modules()]


def _restore_tensor_state(state: list) -> None:
    for m, buffers, attrs in state:
        m._buffers.clear()
        m._buffers.update(buffers)
        for k in [k for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)]:
            if k not in attrs:
                del m.__dict__[k]
        m.__dict__.update(attrs)


def _probe_once(model: nn.Module, fake: bool) -> FlowGraph:
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    is_source = lambda m: weight_kind(m) is not None  # noqa: E731
    if not fake:
        return probe(model, _probe_inputs(model, device), is_source)
    if device.type == "meta":
        # meta kernels lack a few ops models use (autocast, data-dependent checks): probe a
        # copy whose parameters are fake CPU tensors instead (no memory either way)
        model = copy.deepcopy(model)
        device = torch.device("cpu")
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device=device)
            return probe(model, _probe_inputs(model, device), is_source)
    with FakeTensorMode(allow_non_fake_inputs=True):
        return probe(model, _probe_inputs(model, device), is_source)


def run_probe(model: nn.Module) -> FlowGraph:
    """Trace ``model``'s data flow with one forward pass on 4 tokens.

    First on fake tensors (no compute, no memory; a meta model is probed through a fake-CPU
    copy). If the forward cannot run on fake tensors (data-dependent code such as dynamic
    RoPE) and the model holds real weights, the probe runs for real on its device: one small
    forward, nothing kept. The model's training mode, buffers and tensor attributes are
    restored afterwards.
    """
    was_training = model.training
    model.eval()
    config = getattr(model, "config", None)
    experts_impl = getattr(config, "_experts_implementation_internal", None)
    # the gather-based experts kernel runs on fake tensors (eager: nonzero; grouped_mm: bf16)
    if experts_impl is not None:
        config._experts_implementation_internal = "batched_mm"
    state = _snapshot_tensor_state(model)
    try:
        try:
            return _probe_once(model, fake=True)
        except Exception as fake_exc:
            _restore_tensor_state(state)
            if any(p.is_meta for p in model.parameters()):
                raise PlanError(
                    f"the structure probe (one forward pass of {type(model).__name__} on fake "
                    f"tensors) failed: {type(fake_exc).__name__}: {fake_exc}. Shard a model "
                    "with real weights instead (xtp.shard after loading it), or report this "
                    "model type"
                ) from fake_exc
            try:
                with torch.no_grad():
                    return _probe_once(model, fake=False)
            except Exception as exc:
                raise PlanError(
                    f"the structure probe (one forward pass of {type(model).__name__} on 4 "
                    f"tokens) failed: {type(exc).__name__}: {exc}. xtp needs the model's "
                    "forward to run on input_ids alone; pass a model that does, or report "
                    "this model type"
                ) from exc
    finally:
        _restore_tensor_state(state)
        model.train(was_training)
        if experts_impl is not None:
            config._experts_implementation_internal = experts_impl


def _glob_rules(rules: dict[str, str] | None, names: list[str]) -> dict[str, tuple[str, str]]:
    """module name -> (role, pattern) for every rule; validates roles and matches."""
    out: dict[str, tuple[str, str]] = {}
    for pattern, role in (rules or {}).items():
        if role not in RULE_ROLES:
            raise RuleError(
                f"rule {pattern!r}: unknown role {role!r}; valid roles: {', '.join(RULE_ROLES)}"
            )
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            near = sorted({collapse(n) for n in names})[:8]
            raise RuleError(
                f"rule {pattern!r} matches no module; patterns are globs over module paths, "
                f"for example: {', '.join(near)}"
            )
        for n in hits:
            out[n] = (role, pattern)
    return out


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class _Planner:
    def __init__(self, model: nn.Module, tp: int, rules: dict[str, str] | None) -> None:
        self.model, self.tp = model, tp
        self.config = getattr(model, "config", None)
        self.modules = dict(model.named_modules())
        self.kinds = {n: k for n, m in self.modules.items() if (k := weight_kind(m))}
        self.graph = run_probe(model)
        self.rules = _glob_rules(rules, list(self.modules))
        self.heads = mt.head_shape(self.config)
        self.specs: dict[str, ModuleSpec] = {}
        self.kept_whole: dict[str, str] = {}
        # per-head bias tables (T5 relative attention bias): embeddings with one column per head
        self.head_biases = {
            n for n, k in self.kinds.items()
            if k == EMBEDDING and self.heads and self.modules[n].weight.shape[1] == self.heads[0]
            and self.modules[n].weight.shape[0] != mt.config_value(self.config, "vocab_size")
        }
        self.attr_updates: list[AttrUpdate] = []
        self.local_configs: list = []
        self.head_sliced: list = []
        self.partial_grads: list[str] = []
        self.collectives: list[Collective] = []
        self.notes: list[str] = []

    # -- pairs -----------------------------------------------------------------------------
    def _linear(self, name: str) -> bool:
        return self.kinds.get(name) in (OUT_IN, IN_OUT)

    def find_pairs(self) -> dict[str, list[str]]:
        g = self.graph
        pairs: dict[str, list[str]] = {}
        for r in g.order:
            if not self._linear(r):
                continue
            cols = g.producers.get(r, set()) - self.head_biases
            if cols and all(self._linear(c) and g.consumers.get(c) == {r} for c in cols):
                pairs[r] = sorted(cols, key=g.order.index)
        changed = True
        while changed:
            changed = False
            columns = {c for cs in pairs.values() for c in cs}
            for r in list(pairs):
                if r in columns:
                    del pairs[r]
                    changed = True
        return pairs

    def _unsafe_reason(self, row: str, cols: list[str]) -> str | None:
        widths = {in_out(self.modules[c])[1] for c in cols} | {in_out(self.modules[row])[0]}
        head_dim = self.heads[2] if self.heads else None
        for c in cols:
            for mod_name, shapes in self.graph.inner.get(c, {}).items():
                for shape in shapes:
                    if any(d in widths and d != head_dim for d in shape):
                        return (f"{collapse(mod_name)} has a parameter of shape {shape} over "
                                f"the whole inner dimension of {collapse(c)}")
        return None

    # -- specs -----------------------------------------------------------------------------
    def _spec(self, name, role, reason, split=None, ranges=(), layout=None, group=None):
        mod = self.modules[name]
        kind = self.kinds[name]
        w, b = mod.weight, getattr(mod, "bias", None)
        if role == REPLICATE or not ranges:
            nb = _nbytes(w) + _nbytes(b)
            return ModuleSpec(name, role, kind, reason, weight_shape=tuple(w.shape),
                              nbytes=(nb,) * self.tp)
        if kind == EMBEDDING:
            dim = 0 if split == "vocab" else 1
        elif kind == OUT_IN:
            dim = 0 if split == "out" else 1
        else:
            dim = 1 if split == "out" else 0
        full = w.shape[dim]
        per_row = w.numel() // full * w.element_size()
        nbytes = []
        for rk in ranges:
            local = ranges_len(rk)
            bias = 0
            if b is not None:
                bias = local * b.element_size() if split == "out" else _nbytes(b)
            nbytes.append(local * per_row + bias)
        return ModuleSpec(name, role, kind, reason, split=split, full=full, ranges=tuple(ranges),
                          layout=layout, group=group, weight_shape=tuple(w.shape),
                          nbytes=tuple(nbytes))

    def _column_ranges(self, col: str, width: int, hp: HeadPartition | None, mlp):
        out = in_out(self.modules[col])[1]
        leaf = col.rsplit(".", 1)[-1]
        H, K, D = self.heads if self.heads else (0, 0, 0)
        if hp is not None and out == H * D:
            return None, [q_ranges(hp, D, r) for r in range(self.tp)]
        if hp is not None and out == K * D:
            return None, [kv_ranges(hp, D, r) for r in range(self.tp)]
        if hp is None and out == width:
            return None, [(mlp.range(r),) for r in range(self.tp)]
        layout = mt.fused_layout(self.config, leaf)
        if layout is not None:
            need = fused_width(layout, hp, D, width if mlp is not None else 0)
            if need == out:
                return layout, [fused_ranges(layout, r, hp, D, mlp) for r in range(self.tp)]
        raise UnclassifiedModuleError(
            f"cannot classify {collapse(col)} ({type(self.modules[col]).__name__}, "
            f"{out} output features) feeding {width} input features of its row partner: it looks "
            f"like a fused layer whose layout xtp does not know"
            + (f" (heads={H}, kv_heads={K}, head_dim={D})" if self.heads else "")
            + f". Keep it replicated with rules={{'{collapse(col)}': 'replicate'}}, or add its "
            "layout to xtp/model_table.py FUSED_LAYOUTS"
        )

    def plan_pair(self, row: str, cols: list[str]) -> None:
        width = in_out(self.modules[row])[0]
        hp = mlp = None
        H, K, D = self.heads if self.heads else (0, 0, 0)
        if self.heads and width == H * D:
            hp = partition_heads(H, K, self.tp)
            row_ranges = [q_ranges(hp, D, r) for r in range(self.tp)]
            kind = "attention heads"
        elif self.graph.producers.get(row, set()) & self.head_biases:
            raise PlanError(f"{collapse(row)} reads per-head biases but its {width} input "
                            f"features are not num_heads x head_dim ({H} x {D})")
        else:
            mlp = Partition(split_aligned(width, self.tp))
            if min(mlp.sizes) == 0:
                raise PlanError(f"{collapse(row)} has {width} input features, fewer than tp")
            row_ranges = [(mlp.range(r),) for r in range(self.tp)]
            kind = f"{width} features"
        for c in cols:
            for mod_name in self.graph.inner.get(c, {}):
                for pname, _ in self.modules[mod_name].named_parameters(recurse=False):
                    full = f"{mod_name}.{pname}" if mod_name else pname
                    if full not in self.partial_grads:
                        self.partial_grads.append(full)
        col_specs = []
        for c in cols:
            layout, ranges = self._column_ranges(c, width, hp, mlp)
            col_specs.append(self._spec(
                c, COLUMN, f"structure: feeds only {collapse(row)} (split by {kind})",
                split="out", ranges=ranges, layout=layout, group=row))
        for s in col_specs:
            self.specs[s.name] = s
        self.specs[row] = self._spec(
            row, ROW, "structure: reads only "
            + ", ".join(collapse(c).rsplit(".", 1)[-1] for c in cols),
            split="in", ranges=row_ranges, group=row)
        self.collectives.append(Collective("all_reduce", row, in_out(self.modules[row])[1]))
        if hp is not None:
            self._head_updates(row, cols, hp)

    def _head_updates(self, row: str, cols: list[str], hp: HeadPartition) -> None:
        parts = [n.split(".") for n in [row, *cols]]
        common = []
        for segs in zip(*parts):
            if len(set(segs)) != 1:
                break
            common.append(segs[0])
        attn_name = ".".join(common)
        attn = self.modules.get(attn_name)
        if attn is None:
            return
        H, K, D = self.heads
        local_q = [hp.local_heads(r) for r in range(self.tp)]
        local_kv = [hp.local_kv_heads(r) for r in range(self.tp)]
        quantity = {
            mt.Q_HEADS: (H, local_q), mt.KV_HEADS: (K, local_kv),
            mt.KV_GROUPS: (H // K, [q // kv for q, kv in zip(local_q, local_kv)]),
            mt.Q_WIDTH: (H * D, [q * D for q in local_q]),
            mt.KV_WIDTH: (K * D, [kv * D for kv in local_kv]),
        }
        holders = [(n, m) for n, m in attn.named_modules(prefix=attn_name)
                   if n not in self.kinds]  # the attention module and its inner helpers
        for holder_name, holder in holders:
            for attr, what in mt.HEAD_ATTRIBUTES.items():
                value = holder.__dict__.get(attr)
                full, local = quantity[what]
                if (isinstance(value, int) and not isinstance(value, bool) and value == full
                        and any(v != full for v in local)):
                    self.attr_updates.append(AttrUpdate(holder_name, attr, full, tuple(local)))
        for kwarg, layout in mt.HEAD_SLICED_KWARGS.get(
                getattr(self.config, "model_type", None), {}).items():
            self.head_sliced.append((attn_name, kwarg, layout,
                                     tuple(hp.q.range(r) for r in range(self.tp)), H))
        if getattr(self.config, "model_type", None) in mt.LOCAL_CONFIG_MODEL_TYPES and hasattr(
            attn, "config"
        ):
            self.local_configs.append((attn_name, (
                ("num_attention_heads", tuple(local_q)), ("num_key_value_heads", tuple(local_kv)),
            )))
        for name in sorted(self.graph.producers.get(row, set()) & self.head_biases):
            if name not in self.specs:
                self.specs[name] = self._spec(
                    name, HEAD_EMBEDDING, "structure: one bias column per attention head",
                    split="out", ranges=[q_ranges(hp, 1, r) for r in range(self.tp)])

    def plan_embeddings(self) -> None:
        vocab = mt.config_value(self.config, "vocab_size") if self.config is not None else None
        if not isinstance(vocab, int) or vocab < self.tp:
            self.notes.append("no vocabulary size in the config: embeddings stay replicated")
            return
        part = Partition(split_even(vocab, self.tp))
        ranges = [(part.range(r),) for r in range(self.tp)]
        for name in self.graph.order:
            kind = self.kinds.get(name)
            mod = self.modules[name]
            if (kind == EMBEDDING and self.graph.producers.get(name) == {INPUT}
                    and mod.weight.shape[0] == vocab and name not in self.rules):
                self.specs[name] = self._spec(
                    name, VOCAB_EMBEDDING, "structure: input embedding with vocab_size rows",
                    split="vocab", ranges=ranges)
                self.collectives.append(Collective("all_reduce", name, mod.weight.shape[1]))
            elif (self._linear(name) and self.graph.consumers.get(name) == {OUTPUT}
                  and in_out(mod)[1] == vocab and name not in self.specs
                  and name not in self.rules):
                self.specs[name] = self._spec(
                    name, LM_HEAD, "structure: produces the output over vocab_size features",
                    split="out", ranges=ranges)
                self.collectives.append(Collective("all_gather", name, vocab))

    def plan_experts(self) -> None:
        """Fused 3-D experts: split every expert's intermediate dimension."""
        e = mt.EXPERTS
        for name, mod in self.modules.items():
            if not mt.is_fused_experts(mod) or name in self.rules:
                continue
            transposed = bool(mod.is_transposed)
            down = getattr(mod, e.down)
            inter = down.shape[1] if transposed else down.shape[2]
            part = Partition(split_aligned(inter, self.tp))
            concat = bool(getattr(mod, "is_concatenated", True))

            def packed(r, part=part, inter=inter, concat=concat):
                a, b = part.range(r)
                return ((a, b), (inter + a, inter + b)) if concat else ((2 * a, 2 * b),)

            gate_up_name = e.gate_up if getattr(mod, "has_gate", True) else e.up
            in_dim = 2 if transposed else 1
            splits = [
                ParamSplit(gate_up_name, in_dim, tuple(
                    packed(r) if gate_up_name == e.gate_up else (part.range(r),)
                    for r in range(self.tp))),
                ParamSplit(e.down, 1 if transposed else 2,
                           tuple((part.range(r),) for r in range(self.tp))),
            ]
            if getattr(mod, "has_bias", False):
                splits.append(ParamSplit(gate_up_name + e.bias_suffix, 1, splits[0].ranges))
                hidden = down.shape[2] if transposed else down.shape[1]
                splits.append(ParamSplit(e.down + e.bias_suffix, 1,
                                         tuple(((0, hidden),) for _ in range(self.tp)),
                                         zero_off_rank0=True))
            nbytes = []
            for r in range(self.tp):
                total = 0
                for sp in splits:
                    t = getattr(mod, sp.param)
                    per_row = t.numel() // t.shape[sp.dim] * t.element_size()
                    total += per_row * ranges_len(sp.ranges[r])
                nbytes.append(total)
            self.specs[name] = ModuleSpec(
                name, EXPERTS, EXPERT_WEIGHTS,
                f"structure: {down.shape[0]} fused experts, intermediate size {inter} split",
                split="in", full=inter, ranges=tuple((part.range(r),) for r in range(self.tp)),
                weight_shape=tuple(down.shape), nbytes=tuple(nbytes), params=tuple(splits))
            if isinstance(mod.__dict__.get(e.intermediate_attr), int):
                self.attr_updates.append(AttrUpdate(name, e.intermediate_attr, inter,
                                                    tuple(part.sizes)))
            hidden_dim = down.shape[2 if transposed else 1]
            self.collectives.append(Collective("all_reduce", name, hidden_dim))

    def run(self) -> ShardPlan:
        pairs = self.find_pairs()
        for row, cols in pairs.items():
            ruled = [n for n in [row, *cols] if n in self.rules]
            if ruled:
                for n in [row, *cols]:
                    role, pattern = self.rules.get(n, (REPLICATE, None))
                    self.kept_whole[n] = (f"rule {pattern!r}" if pattern else
                                          f"rule on its partner {collapse(ruled[0])}")
                continue
            unsafe = self._unsafe_reason(row, cols)
            if unsafe:
                for n in [row, *cols]:
                    self.kept_whole[n] = f"kept whole: {unsafe}"
                note = f"{collapse(row)} and its partners kept replicated: {unsafe}"
                if note not in self.notes:
                    self.notes.append(note)
                continue
            self.plan_pair(row, cols)
        self.plan_embeddings()
        self.plan_experts()
        # tied weights must be sharded identically
        self._check_ties()
        for name in self.kinds:
            if name not in self.specs:
                role, pattern = self.rules.get(name, (None, None))
                reason = (f"rule {pattern!r}" if pattern else self.kept_whole.get(
                    name, "structure: its output joins the residual stream (not paired)"))
                self.specs[name] = self._spec(name, REPLICATE, reason)
        self.collectives = [c for c in self.collectives if self.specs.get(c.source)
                            and self.specs[c.source].role in SHARDED_ROLES]
        order = {n: i for i, n in enumerate(self.modules)}
        specs = tuple(self._count_tied_once(
            sorted(self.specs.values(), key=lambda s: order[s.name])))
        covered = {id(p) for s in specs for p in self.modules[s.name].parameters(recurse=False)}
        replicated = sum(_nbytes(p) for p in {id(p): p for p in self.model.parameters()}.values()
                         if id(p) not in covered)
        replicated += sum(_nbytes(b) for b in self.model.buffers())
        return ShardPlan(
            tp_size=self.tp, model_type=getattr(self.config, "model_type", None), specs=specs,
            attr_updates=tuple(self.attr_updates), local_configs=tuple(self.local_configs),
            head_sliced_kwargs=tuple(self.head_sliced),
            partial_grad_params=tuple(self.partial_grads),
            collectives=tuple(self.collectives), replicated_bytes=replicated,
            notes=tuple(self.notes), tp_plan_differences=tuple(self._compare_tp_plan(specs)),
            head_shape=self.heads,
        )

    def _count_tied_once(self, specs: list[ModuleSpec]) -> list[ModuleSpec]:
        """A weight shared by several modules counts in bytes_per_rank once (its first user)."""
        seen: set[int] = set()
        out = []
        for s in specs:
            w = getattr(self.modules[s.name], "weight", None)
            if w is not None and id(w) in seen:
                bias = getattr(self.modules[s.name], "bias", None)
                if bias is None:
                    s = dataclasses.replace(s, nbytes=(0,) * self.tp)
                else:
                    per = [s.local_extent(r) if s.split == "out" else bias.numel()
                           for r in range(self.tp)]
                    s = dataclasses.replace(
                        s, nbytes=tuple(n * bias.element_size() for n in per))
            elif w is not None:
                seen.add(id(w))
            out.append(s)
        return out

    def _check_ties(self) -> None:
        by_param: dict[int, list[str]] = defaultdict(list)
        for name in self.kinds:
            by_param[id(self.modules[name].weight)].append(name)
        for names in by_param.values():
            if len(names) < 2:
                continue
            for n in names:  # a tied module never called in the probe follows its partners
                partner = next((self.specs[m] for m in names if m in self.specs
                                and self.kinds[m] == self.kinds[n]), None)
                if n not in self.graph.order and n not in self.specs and partner is not None:
                    self.specs[n] = ModuleSpec(
                        n, partner.role, partner.kind, f"tied to {collapse(partner.name)}",
                        partner.split, partner.full, partner.ranges, partner.layout,
                        weight_shape=partner.weight_shape, nbytes=partner.nbytes)
            specs = [self.specs.get(n) for n in names]
            sharded = [s for s in specs if s is not None and s.role in SHARDED_ROLES]
            if not sharded:
                continue
            ranges = {s.ranges for s in sharded}
            if len(sharded) != len(names) or len(ranges) != 1:
                groups = {s.group for s in sharded if s.group}
                partners = [s.name for s in self.specs.values() if s.group in groups]
                for n in [*names, *partners]:
                    self.specs[n] = self._spec(n, REPLICATE, "tied weight shared with a module "
                                               "that cannot be sharded the same way"
                                               if n in names else "its row/column partner is "
                                               "kept whole (tied weight)")
                self.notes.append(f"tied weights {', '.join(names)} kept replicated")

    def _compare_tp_plan(self, specs) -> list[str]:
        tp_plan = getattr(self.config, "base_model_tp_plan", None) or {}
        if not tp_plan:
            return []
        base = getattr(self.model, "base_model_prefix", "")
        want = {"colwise": COLUMN, "rowwise": ROW, "packed_colwise": COLUMN,
                "embedding_rowwise": VOCAB_EMBEDDING, "colwise_gather_output": COLUMN,
                "rowwise_split_input": ROW}
        diffs = []
        seen = set()
        for s in specs:
            rel = s.name[len(base) + 1:] if base and s.name.startswith(base + ".") else s.name
            for pattern, style in tp_plan.items():
                if fnmatch.fnmatchcase(rel, pattern) and style in want and want[style] != s.role:
                    key = (collapse(s.name), style, s.role)
                    if key not in seen:
                        seen.add(key)
                        diffs.append(f"{collapse(s.name)}: transformers says {style}, xtp "
                                     f"chose {s.role} ({s.reason})")
        return diffs


def derive_plan(model: nn.Module, tp_size: int, rules: dict[str, str] | None = None) -> ShardPlan:
    """Plan ``model`` for ``tp_size`` ranks. See the module docstring for the rules."""
    return _Planner(model, tp_size, rules).run()
