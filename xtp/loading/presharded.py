"""Loading a pre-sharded folder (:mod:`xtp.formats.presharded`): this rank's file only, with
the plan stored in the folder (checked against the model and, given ``rules``, against the
plan they give)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..accelerators import Communicator
from ..distributed.context import TPContext
from ..errors import CheckpointError
from ..formats.checkpoint_index import CheckpointIndex
from ..formats.presharded import METADATA, read_metadata
from ..formats.safetensors_io import read_header
from ..planning.derive import derive_plan
from ..planning.serialize import fingerprint, plan_from_json
from .common import fill_model, finish_load, load_config, resolve_dtype, skeleton
from .sources import RankFileSource


def saved_model_class(path: str | None) -> type | None:
    """The class a folder's metadata names (``module.Class``), when it can be imported."""
    if not isinstance(path, str) or "." not in path:
        return None
    import importlib

    mod, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) else None


def load_presharded(folder: Path, ctx: TPContext, dtype, model_class: type | None,
                    rules: dict | None, progress: bool | None,
                    communicator: Communicator | Callable | None) -> nn.Module:
    """This rank's file of a pre-sharded folder, with the stored plan (see the module doc)."""
    meta = read_metadata(folder)
    n = int(meta["tp_size"])
    if n != ctx.tp_size:
        raise CheckpointError(
            f"{folder} was pre-sharded for tp_size={n}, this run has tp_size={ctx.tp_size}. "
            f"Run with {n} ranks (torchrun --nproc-per-node {n}), or re-shard it: "
            f"`xtp gather {folder} FULL_DIR` then `xtp preshard FULL_DIR OUT_DIR --tp "
            f"{ctx.tp_size}`")
    config = load_config(folder)
    dtype = resolve_dtype(dtype, None, getattr(torch, meta["dtype"]))
    model = skeleton(config, model_class or saved_model_class(meta.get("model_class")), dtype)
    plan = plan_from_json(meta["plan"])
    if fingerprint(plan) != meta["plan_fingerprint"]:
        raise CheckpointError(f"{folder / METADATA}: the stored plan does not match its "
                              "fingerprint; the metadata was edited or damaged")
    modules = dict(model.named_modules())
    for spec in plan.specs:
        mod = modules.get(spec.name)
        shapes = {tuple(p.shape) for p in mod.parameters(recurse=False)} if mod else set()
        if mod is None or (spec.weight_shape and tuple(spec.weight_shape) not in shapes):
            raise CheckpointError(f"{folder}: the stored plan names {spec.name} "
                                  f"{list(spec.weight_shape)}, which this model does not have; "
                                  "the folder belongs to another model")
    if rules is not None and fingerprint(derive_plan(model, n, rules)) != fingerprint(plan):
        raise CheckpointError(f"{folder} was pre-sharded with another plan than rules={rules} "
                              "give; load it without rules, or pre-shard again with them")
    path = folder / meta["files"][str(ctx.tp_rank)]["file"]
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the pre-sharded folder {folder}")
    _, file_meta = read_header(path)
    if file_meta.get("xtp_plan_fingerprint") != meta["plan_fingerprint"] or \
            file_meta.get("xtp_rank") != str(ctx.tp_rank):
        raise CheckpointError(f"{path} was not written with this folder's plan for rank "
                              f"{ctx.tp_rank}; pre-shard the folder again")
    with CheckpointIndex(folder, [path], "safetensors", {}) as ckpt:
        source = RankFileSource(ckpt, model)
        report = fill_model(model, plan, ctx, source, folder, dtype, progress, ckpt.stats)
    report.presharded = True
    return finish_load(model, plan, ctx, communicator, folder, report)
