"""Training checkpoints of sharded models: save, resume at the same tp, re-shard at another.

Folder layout written by :func:`save_training_state` (collective: every rank of the world)::

    model/                              xtp.save_sharded folder: this checkpoint's weights,
                                        loadable by xtp.from_pretrained at the same tp and
                                        turned into an ordinary checkpoint by ``xtp gather``
    optimizer-rank-{r}-of-{n}.pt        TP rank r's optimizer state (its shards), keyed by
                                        parameter name, written by data-parallel replica 0
    rng-rank-{g}-of-{world}.pt          global rank g's random state (default generators of
                                        the CPU and the rank's device; tensor-parallel region
                                        streams derive from them), for bit-for-bit resumption
                                        with dropout
    training_state.json                 format, tp/dp sizes, step, optimizer class, ``extra``
    .xtp_training_complete              written last; a folder without it is never loaded

:func:`gather_training_state` (offline, one process) turns that folder into full tensors: the
model's full ``state_dict`` and each parameter's full optimizer state, and optionally writes a
*full* folder (``state.pt`` + ``training_state.json``). :func:`load_training_state` accepts
either kind of folder on a model sharded at any tp (or an unsharded model): at the saved tp it
reads only this rank's files; otherwise it gathers every rank's file and keeps this rank's
slice under the model's own plan, so 2 -> 3 -> 2 re-sharding continues the same run.

Optimizer state is stored by parameter *name* (``model.named_parameters()``), so the optimizer
must be built over the model's parameters (any grouping); state tensors shaped like their
parameter (``exp_avg``, ``momentum_buffer``...) are split like it, others (``step``) are kept
whole. The data-parallel dimension is assumed replicated (DDP or the minimal
:func:`xtp.training.all_reduce_dp_gradients`): replica 0 is saved, every replica loads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distributed.consistency import all_ranks_ok
from ..errors import CheckpointError, XtpError
from ..formats.json_object import read_json_object
from ..loading.entries import param_split
from ..planning.layouts import gather_ranges, take_ranges
from ..planning.spec import ShardPlan
from ..sharding.packing import require_dense
from ..sharding.rng import default_generator
from ..sharding.state import sharded_context, sharded_plan

FORMAT, FORMAT_VERSION = "xtp-training-state", 1
META, MARKER, FULL_STATE = "training_state.json", ".xtp_training_complete", "state.pt"


def optimizer_file(rank: int, tp_size: int) -> str:
    return f"optimizer-rank-{rank}-of-{tp_size}.pt"


def rng_file(rank: int, world: int) -> str:
    return f"rng-rank-{rank}-of-{world}.pt"


def _plan_ctx(model: nn.Module):
    return sharded_plan(model), sharded_context(model)


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with parameter names instead of indices."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(order) if id(p) not in names]
    if missing:
        raise XtpError(f"the optimizer holds {len(missing)} tensors that are not parameters of "
                       "this model; build it over model.parameters()")
    sd = optimizer.state_dict()
    state = {names[id(order[i])]: {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                   for k, v in s.items()}
             for i, s in sd["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [names[id(order[i])] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def _load_optimizer_by_name(model: nn.Module, optimizer: torch.optim.Optimizer,
                            named: dict) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names.get(id(p)) for g in optimizer.param_groups for p in g["params"]]
    index = {n: i for i, n in enumerate(order)}
    if len(named["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"the checkpoint has {len(named['param_groups'])} parameter "
                              f"groups, this optimizer {len(optimizer.param_groups)}")
    groups = []
    for saved, own in zip(named["param_groups"], optimizer.param_groups):
        if sorted(saved["params"]) != sorted(names.get(id(p)) for p in own["params"]):
            raise CheckpointError("the optimizer's parameter groups hold other parameters than "
                                  "the saved ones; build it over the same parameters")
        groups.append({**{k: v for k, v in saved.items() if k != "params"},
                       "params": [index[names[id(p)]] for p in own["params"]]})
    state = {index[n]: s for n, s in named["state"].items() if n in index}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_state(device: torch.device) -> dict:
    """Default generators of the CPU and ``device`` (tensor-parallel region streams derive
    from them: :class:`xtp.sharding.rng.RegionRNG`)."""
    out = {"cpu": torch.default_generator.get_state()}
    gen = default_generator(device) if device.type != "cpu" else None
    if gen is not None:
        out["device"] = (str(device), gen.get_state())
    return out


def _set_rng_state(state: dict) -> None:
    torch.default_generator.set_state(state["cpu"])
    if "device" in state:
        gen = default_generator(torch.device(state["device"][0]))
        if gen is not None:
            gen.set_state(state["device"][1])


def save_training_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                        path: str | os.PathLike, *, step: int | None = None,
                        extra: dict | None = None) -> Path:
    """Write ``model``'s shards, ``optimizer``'s state and every rank's random state to
    ``path`` (collective: call on every rank of the world, with the same arguments).

    Args:
        model: a model sharded by :func:`xtp.shard` or loaded by :func:`xtp.from_pretrained`
            (any tp, 1 included).
        optimizer: a ``torch.optim`` optimizer over ``model``'s parameters.
        step, extra: stored in ``training_state.json`` (``extra`` must be JSON-serialisable)
            and returned by :func:`load_training_state`.

    The folder must be on a file system every rank sees. Returns ``Path(path)``.
    """
    from ..loading.save import save_sharded

    plan, ctx = _plan_ctx(model)
    if plan is None or ctx is None:
        raise XtpError("save_training_state needs a model sharded by xtp.shard() (tp_size=1 "
                       "works too) or loaded by xtp.from_pretrained()")
    folder = Path(path)
    if ctx.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).unlink(missing_ok=True)
    if not all_ranks_ok(True, ctx, f"save_training_state({folder}) before writing"):
        raise CheckpointError("another rank failed before writing")
    save_sharded(model, folder / "model")
    error = None
    try:
        if ctx.dp_rank == 0:
            torch.save(optimizer_state_by_name(model, optimizer),
                       folder / optimizer_file(ctx.tp_rank, ctx.tp_size))
        torch.save(_rng_state(ctx.device), folder / rng_file(ctx.rank, ctx.world_size))
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        error = exc
    if not all_ranks_ok(error is None, ctx,
                        f"save_training_state({folder}) after the optimizer and RNG files"):
        raise CheckpointError(f"writing {folder} failed on some rank"
                              + (f": {error}" if error else "")) from error
    if ctx.rank == 0:
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "sharded",
                "tp_size": ctx.tp_size, "dp_size": ctx.dp_size, "world_size": ctx.world_size,
                "step": step, "extra": extra, "optimizer": type(optimizer).__qualname__}
        (folder / META).write_text(json.dumps(meta, indent=1))
        (folder / MARKER).write_text("ok\n")
    all_ranks_ok(True, ctx, f"save_training_state({folder}) finishing the folder")
    return folder


def read_training_meta(path: str | os.PathLike) -> dict:
    """``training_state.json`` of a complete training checkpoint (CheckpointError otherwise)."""
    folder = Path(path)
    if not (folder / MARKER).is_file():
        raise CheckpointError(f"{folder} is not a complete xtp training checkpoint (no "
                              f"{MARKER}): its writing was interrupted, or it is another folder")
    meta = read_json_object(folder / META, "the training checkpoint is damaged: save it again")
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder / META} is format {meta.get('format')!r} version "
                              f"{meta.get('format_version')}; this xtp reads {FORMAT} <= "
                              f"{FORMAT_VERSION}")
    return meta


def _saved_plan(folder: Path) -> tuple[ShardPlan, dict[str, str]]:
    """The plan the checkpoint's model was sharded with, and its ``{tie target: source}``."""
    from ..formats.presharded import read_metadata
    from ..planning.serialize import plan_from_json

    meta = read_metadata(folder / "model")
    return plan_from_json(meta["plan"]), dict(meta.get("tied") or {})


def _rank_model_state(folder: Path, rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from ..formats.presharded import rank_file

    return load_file(str(folder / "model" / rank_file(rank, tp_size)))


def _full_extent(split, local: torch.Tensor) -> int:
    return max(b for ranges in split.ranges for _, b in ranges) if split.ranges else \
        local.shape[split.dim]


def _gather(plan: ShardPlan, name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
    split = param_split(plan, name)
    if split is None or split.zero_off_rank0:  # replicated, or only rank 0's counts
        return pieces[0]
    return gather_ranges(pieces, split.dim, split.ranges, _full_extent(split, pieces[0]))


def gather_training_state(path: str | os.PathLike, out: str | os.PathLike | None = None
                          ) -> dict[str, Any]:
    """Full tensors of a sharded training checkpoint (offline, one process, no group).

    Returns ``{"model": full state_dict (every alias of a tied weight), "optimizer":
    {"state": {name: {key: full tensor or value}}, "param_groups": [...]}, "step", "extra"}``.
    With ``out``, also writes the *full* folder (``state.pt``), which
    :func:`load_training_state` re-shards at any tp. Memory: the whole model and optimizer.
    """
    folder = Path(path)
    meta = read_training_meta(folder)
    if meta["kind"] == "full":
        full = torch.load(folder / FULL_STATE, weights_only=True)
        return {**full, "step": meta.get("step"), "extra": meta.get("extra")}
    n = int(meta["tp_size"])
    plan, tied = _saved_plan(folder)
    models = [_rank_model_state(folder, r, n) for r in range(n)]
    model = {name: _gather(plan, name, [m[name] for m in models]) for name in models[0]}
    for target, source in tied.items():  # tied weights are stored once, under the source
        if source in model and target not in model:
            model[target] = model[source]
    optims = [torch.load(folder / optimizer_file(r, n), weights_only=True) for r in range(n)]
    state = {}
    for name, entry in optims[0]["state"].items():
        local = models[0].get(name, models[0].get(tied.get(name, "")))
        state[name] = {
            k: _gather(plan, name, [o["state"][name][k] for o in optims])
            if isinstance(v, torch.Tensor) and local is not None and v.shape == local.shape
            else v
            for k, v in entry.items()}
    full = {"model": model, "optimizer": {"state": state,
                                          "param_groups": optims[0]["param_groups"]}}
    if out is not None:
        dst = Path(out)
        dst.mkdir(parents=True, exist_ok=True)
        (dst / MARKER).unlink(missing_ok=True)
        torch.save(full, dst / FULL_STATE)
        (dst / META).write_text(json.dumps({**meta, "kind": "full", "tp_size": 1, "dp_size": 1,
                                            "world_size": 1, "source": str(folder)}, indent=1))
        (dst / MARKER).write_text("ok\n")
    return {**full, "step": meta.get("step"), "extra": meta.get("extra")}


def _local(plan: ShardPlan | None, rank: int, name: str, full: torch.Tensor) -> torch.Tensor:
    split = param_split(plan, name)
    if split is None:
        return full
    local = take_ranges(full, split.dim, split.ranges[rank])
    return local.zero_() if split.zero_off_rank0 and rank != 0 else local


def _aliases(model: nn.Module) -> list[tuple[list[str], torch.Tensor]]:
    groups: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), ([], t))[0].append(name)
    return list(groups.values())


def _copy_model_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    with torch.no_grad():
        for names, t in _aliases(model):
            src = next((tensors[n] for n in names if n in tensors), None)
            if src is None:
                raise CheckpointError(f"{where} has no tensor for {names[0]}")
            if tuple(src.shape) != tuple(t.shape):
                raise CheckpointError(f"{where}: {names[0]} is {list(src.shape)} there, "
                                      f"{list(t.shape)} in this model (another model or plan?)")
            t.copy_(src)


def load_training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        path: str | os.PathLike, *, load_model: bool = True,
                        load_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint of :func:`save_training_state` or :func:`gather_training_state`
    into ``model`` (sharded at any tp, or unsharded) and ``optimizer`` (built over it).

    At the saved tp (same plan) each rank reads only its own files, and, in a world of the
    saved size, its own random state (``load_rng``). At another tp every rank reads all the
    saved ranks' files and keeps its slice; random state is not restored (the TP layout of
    the random streams changed). Returns ``{"step": ..., "extra": ...}``.
    """
    require_dense(model, "xtp.load_training_state")
    from ..planning.serialize import fingerprint

    folder = Path(path)
    meta = read_training_meta(folder)
    plan, ctx = _plan_ctx(model)
    tp, rank = (plan.tp_size, ctx.tp_rank) if plan is not None and ctx is not None else (1, 0)
    same = (meta["kind"] == "sharded" and int(meta["tp_size"]) == tp and plan is not None
            and fingerprint(_saved_plan(folder)[0]) == fingerprint(plan))
    if same:
        tensors = _rank_model_state(folder, rank, tp)
        optim = torch.load(folder / optimizer_file(rank, tp), weights_only=True)
    else:
        full = gather_training_state(folder)
        tensors = {n: _local(plan, rank, n, t) for n, t in full["model"].items()}
        optim = full["optimizer"]
        params = dict(model.named_parameters())
        for name, entry in optim["state"].items():
            ref = full["model"].get(name)
            if name not in params or ref is None:
                continue
            optim["state"][name] = {
                k: _local(plan, rank, name, v)
                if isinstance(v, torch.Tensor) and v.shape == ref.shape else v
                for k, v in entry.items()}
    if load_model:
        _copy_model_state(model, tensors, folder)
    if optimizer is not None:
        _load_optimizer_by_name(model, optimizer, optim)
    world = ctx.world_size if ctx is not None else 1
    if load_rng and same and int(meta["world_size"]) == world:
        g = ctx.rank if ctx is not None else 0
        _set_rng_state(torch.load(folder / rng_file(g, world), weights_only=True))
    return {"step": meta.get("step"), "extra": meta.get("extra")}
