"""The shard-time check: can the model's own forward run with each rank's local shapes?

A plan can be consistent in itself and still give shapes the model's forward cannot run: a head
count the forward reads from a place the planner did not make local, a per-head parameter that
was not sliced with its heads, a reshape by a width that kept its full value. Such a sharding
would crash in the first forward on every rank, or worse, run with shapes that happen to fit.

:func:`check_local_forward` runs the forward once per distinct rank layout, before the model is
touched, on a *structural copy* of the model: every parameter and buffer a fake tensor
(no memory, no compute), the plan applied to the copy exactly as :func:`~xtp.sharding.apply.
apply_plan` applies it to the model (classes swapped, attributes and configs made local, hooks
added), its collectives replaced by :class:`ShapeCommunicator` (the shapes of a sum and of a
gather, no data). A forward that raises here is refused with :class:`~xtp.errors.
ShardedForwardError` and the model stays as it was.

Cost per ``shard()`` call: one copy of the module tree (no weights) and one fake forward on 4
tokens per distinct rank layout (one when the heads split evenly, at most ``tp``), plus one
fake forward of the unsharded copy when a sharded one fails (to tell a sharding fault from a
forward that cannot run on fake tensors at all: then the check says nothing).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn

from ..accelerators import Communicator
from ..errors import ShardedForwardError
from ..planning.render import collapse
from ..planning.spec import ShardPlan
from ..planning.towers import tower_inputs
from ..planning.trace import _probe_inputs as probe_inputs
from .apply import _changes, apply_plan, slice_param


class ShapeCommunicator(Communicator):
    """Collectives of a group of ``world`` ranks that compute shapes only: a sum keeps its
    input's shape, a gather concatenates ``sizes`` (or ``world`` equal pieces) along ``dim``."""

    def __init__(self, world: int, rank: int) -> None:
        self.group = None
        self._world, self._rank = world, rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def rank(self) -> int:
        return self._rank

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1,
                   sizes: Sequence[int] | None = None) -> torch.Tensor:
        shape = list(tensor.shape)
        shape[dim] = sum(sizes) if sizes else shape[dim] * self._world
        return tensor.new_empty(shape)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = -1,
                       sizes: Sequence[int] | None = None) -> torch.Tensor:
        shape = list(tensor.shape)
        shape[dim] = sizes[self._rank] if sizes else shape[dim] // self._world
        return tensor.new_empty(shape)

    def barrier(self) -> None:
        return None


def rank_layouts(plan: ShardPlan) -> dict[tuple, int]:
    """One rank per distinct local layout: ``{signature: rank}``, the signature being every
    size that differs between ranks (local extents, attribute values, local configs, the number
    of head-sliced heads)."""
    out: dict[tuple, int] = {}
    for r in range(plan.tp_size):
        sig = (
            tuple(sum(b - a for a, b in split.ranges[r]) for spec in plan.sharded()
                  for split in spec.param_splits()),
            tuple(u.values[r] for u in plan.attr_updates),
            tuple(v[r] for _, values in plan.local_configs for _, v in values),
            tuple(h[3][r][1] - h[3][r][0] for h in plan.head_sliced_kwargs),
        )
        out.setdefault(sig, r)
    return out


def _structural_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters are meta tensors (no weight copied; buffers,
    usually small, are copied as they are)."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo.setdefault(id(p), nn.Parameter(torch.empty_like(p, device="meta"),
                                            requires_grad=p.requires_grad))
    return copy.deepcopy(model, memo)


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Give every (meta) parameter of ``model`` a zero tensor of its shape on ``device`` (fake
    under a FakeTensorMode); tied parameters stay one."""
    done: dict[int, nn.Parameter] = {}
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=device),
                                               requires_grad=False)
                m._parameters[name] = done[id(p)]


def _forward(model: nn.Module, device: torch.device, fake: bool, towers: tuple = ()) -> None:
    """One forward of ``model`` (parameters on meta) on the probe's inputs, and one of each
    of ``towers`` ((module, input name, shape), :attr:`ShardPlan.tower_inputs`) on zeros of
    its input: on fake tensors, or for real with zero weights."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model.eval()
    config = getattr(model, "config", None)
    if fake and getattr(config, "_experts_implementation_internal", None) is not None:
        config._experts_implementation_internal = "batched_mm"  # as the probe: runs on fakes
    quiet = logging.getLogger("torch._subclasses.fake_tensor")  # logs each failing op's trace
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        with (FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
              ), torch.no_grad():
            _materialize(model, device)
            model(**probe_inputs(model, device))
            for name, key, shape in towers:
                tower = model.get_submodule(name)
                dtype = next(tower.parameters()).dtype
                tower(**tower_inputs(tower, key, torch.zeros(shape, dtype=dtype, device=device)))
    finally:
        quiet.setLevel(level)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def _failing_module(local: nn.Module, exc: BaseException) -> str:
    """The path of the innermost module of ``local`` whose code the traceback of ``exc`` passes
    through (``""`` for the root, or when none is found)."""
    names = {id(m): n for n, m in local.named_modules()}
    found = ""
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def _run(model: nn.Module, plan: ShardPlan | None, rank: int, device: torch.device,
         fake: bool, towers: tuple = ()) -> tuple[Exception, str] | None:
    """The exception the forward of ``model`` sharded as rank ``rank`` of ``plan`` (unsharded
    when ``plan`` is None) raises and the module it was raised in, or ``None``."""
    local = _structural_copy(model)
    if plan is not None:
        changes = _changes(local, plan, lambda t, split: slice_param(t, split, rank))
        ctx = SimpleNamespace(tp_rank=rank, device=None)
        apply_plan(local, plan, ctx, changes, ShapeCommunicator(plan.tp_size, rank))
    try:
        _forward(local, device, fake, towers)
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        return exc, _failing_module(local, exc)
    return None


def _refusal(model: nn.Module, plan: ShardPlan, rank: int, exc: Exception, where: str
             ) -> ShardedForwardError:
    lines = str(exc).strip().splitlines()
    rule = f"'{collapse(where)}.*'" if where else "'<module glob>'"
    return ShardedForwardError(
        f"the forward of {type(model).__name__} cannot run sharded this way: with rank "
        f"{rank}'s local weights and head counts (tp_size={plan.tp_size}), "
        f"{collapse(where) or 'the model'} raises {type(exc).__name__}: "
        f"{(lines[0] if lines else '')[:200]}. It uses a size xtp did not make local (a head "
        f"count kept where the planner does not look, a per-head parameter); keep it "
        f"replicated with rules={{{rule}: 'replicate'}}, try another tp_size, or report this "
        "model type"
    )


def check_local_forward(model: nn.Module, plan: ShardPlan) -> None:
    """Refuse ``plan`` when ``model``'s forward cannot run with some rank's local shapes.

    Runs the forward of each distinct rank layout (:func:`rank_layouts`) on a structural copy
    of ``model`` (nothing on ``model`` changes): on fake tensors; a failure there counts only
    if the unsharded copy runs on fake tensors. When it does not (data-dependent code: the
    probe ran for real too), each layout runs once for real with zero weights of its local
    shapes (memory: one rank's shard). A model whose weights are on the meta device is not
    checked.

    Raises:
        ShardedForwardError: the sharded forward of some rank raises (the message names the
            rank, the module, the exception, and the rule that keeps that module unsharded).
    """
    if plan.tp_size < 2 or not plan.sharded() or any(p.is_meta for p in model.parameters()):
        return
    device = _device(model)
    layouts = list(rank_layouts(plan).values())
    for rank in layouts:
        found = _run(model, plan, rank, device, fake=True, towers=plan.tower_inputs)
        if found is None:
            continue
        if _run(model, None, 0, device, fake=True, towers=plan.tower_inputs) is None:
            raise _refusal(model, plan, rank, *found) from found[0]
        break  # the forward does not run on fake tensors: check for real
    else:
        return
    for rank in layouts:
        found = _run(model, plan, rank, device, fake=False, towers=plan.tower_inputs)
        if found is not None:
            raise _refusal(model, plan, rank, *found) from found[0]
