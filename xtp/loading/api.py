"""``xtp.from_pretrained(path)``: build on meta, plan, read only this rank's slices, shard.

Steps (each rank; the only communication is one small all-gather of fingerprints, as in
:func:`xtp.shard`, so ranks given different models fail together): read ``config.json`` ->
build the model on the meta device (:func:`xtp.models.build.meta_model`) -> derive the plan ->
check the checkpoint's headers against the model (missing, unexpected, wrong shape:
:class:`~xtp.errors.CheckpointError` before any data is read) -> read every tensor's slice for
this rank straight onto ``ctx.device`` in the target dtype (:mod:`xtp.loading.sources`) ->
rebuild non-persistent buffers (:mod:`xtp.loading.buffers`) -> apply the plan (class swaps,
attributes) as :func:`xtp.shard` does. The result equals
``xtp.shard(transformers_model.from_pretrained(path))`` tensor for tensor. A pre-sharded folder
(:mod:`xtp.formats.presharded`) is read by :mod:`xtp.loading.presharded` instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from ..accelerators import Communicator
from ..distributed.context import TPContext
from ..errors import CheckpointError
from ..formats.checkpoint_index import CheckpointIndex
from ..formats.presharded import is_presharded, leftovers, read_metadata
from ..models.inputs import check_dtype, check_path, check_rules, check_tp_size
from ..planning.derive import derive_plan
from .common import (
    context_for,
    fill_model,
    finish_load,
    load_config,
    resolve_dtype,
    saved_class,
    skeleton,
)
from .presharded import load_presharded
from .sources import FullCheckpointSource


def from_pretrained(
    path: str | os.PathLike,
    tp_size: int | None = None,
    dtype: torch.dtype | str | None = None,
    model_class: type | None = None,
    rules: dict[str, str] | None = None,
    context: TPContext | None = None,
    progress: bool | None = None,
    *,
    communicator: Communicator | Callable[[Communicator], Communicator] | None = None,
) -> nn.Module:
    """Load a local checkpoint folder straight into this rank's shards.

    Args:
        path: a folder with ``config.json`` and safetensors (single file or index) or
            ``pytorch_model.bin`` weights; or a folder written by :func:`xtp.save_sharded` /
            ``xtp preshard`` (then only this rank's file is read, with the stored plan).
        tp_size: ranks per TP group (default: the whole world; 1 without a launcher).
        dtype: parameter dtype (default: the config's ``dtype``, else the stored one).
        model_class: e.g. ``transformers.AutoModelForCausalLM`` (default: the class named in
            ``config.architectures``, else a causal LM, seq2seq LM or bare model).
        rules: planner overrides, as for :func:`xtp.shard`.
        context: a :class:`~xtp.TPContext` (default: :func:`xtp.init_distributed`).
        progress: show files/bytes read on rank 0 (default: when stderr is a terminal).
        communicator: as for :func:`xtp.shard`.

    Returns the sharded model in eval mode; :func:`load_report` tells the bytes read.

    Raises:
        ArgumentError: ``path``, ``dtype`` or ``rules`` of the wrong kind (before anything
            starts).
        TPSizeError: ``tp_size`` not a positive integer.
        CheckpointError: missing/unexpected tensors, wrong shapes, damaged or truncated files,
            an index naming absent files, a pre-sharded folder for another tp_size.
    """
    folder = check_path(path, "path")
    left = leftovers(folder)
    if not folder.is_dir() and left:
        raise CheckpointError(
            f"{folder} is incomplete: its writing (save_sharded or xtp preshard) was "
            f"interrupted and left {left} next to it; write it again")
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is not a folder; xtp.from_pretrained reads a local checkpoint folder "
            "(download a hub model first, e.g. huggingface_hub.snapshot_download(repo_id))")
    if tp_size is not None:
        check_tp_size(tp_size)
    check_rules(rules)
    if dtype != "auto":
        check_dtype(dtype)  # before any rank waits on the process group
    if is_presharded(folder):
        read_metadata(folder)  # a damaged or incomplete folder fails here, before any rank waits
        ctx = context_for(context, tp_size)
        return load_presharded(folder, ctx, dtype, model_class, rules, progress, communicator)
    config = load_config(folder)  # checked before the process group starts
    ctx = context_for(context, tp_size)
    with CheckpointIndex.open(folder) as ckpt:
        model = None
        stored = None
        if dtype in (None, "auto") and getattr(config, "dtype", None) is None:
            stored = next((ckpt.info(k).dtype for k in ckpt.keys()
                           if ckpt.info(k).dtype.is_floating_point), None)
        dtype = resolve_dtype(dtype, config, stored)
        model = skeleton(config, model_class or saved_class(config), dtype)
        plan = derive_plan(model, ctx.tp_size, rules)
        source = FullCheckpointSource(ckpt, model)
        report = fill_model(model, plan, ctx, source, folder, dtype, progress, ckpt.stats)
    return finish_load(model, plan, ctx, communicator, folder, report)
