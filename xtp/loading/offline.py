"""Offline, single-process conversions between full and pre-sharded checkpoints.

* :func:`preshard`: full checkpoint -> per-rank files for a target tp_size, without starting
  any rank (each rank's slices are read and written one tensor at a time).
* :func:`gather`: pre-sharded folder -> one ordinary checkpoint (``model.safetensors``, or
  numbered files plus ``model.safetensors.index.json`` past ``max_shard_size``) that
  ``transformers`` loads unchanged. Names and layout are what ``save_pretrained`` writes: tied
  weights once, transformers' weight conversions reverted (per-expert tensors again for MoE
  models). Memory: the tensors of one conversion group (usually one tensor) at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..formats.checkpoint_index import CheckpointIndex
from ..formats.keymap import tied_sources
from ..formats.presharded import (
    METADATA,
    commit,
    export_name,
    metadata,
    prepare_target,
    rank_file,
    read_metadata,
    save_config,
    temp_folder,
    write_rank_file,
)
from ..formats.safetensors_io import StreamWriter
from ..models.inputs import check_dtype, check_path, check_tp_size
from ..planning.derive import derive_plan
from ..planning.layouts import gather_ranges
from ..planning.serialize import plan_from_json
from .buffers import rebuild_non_persistent
from .common import entry_dtype, load_config, resolve_dtype, saved_class, skeleton
from .entries import local_entries, param_split
from .presharded import saved_model_class
from .progress import Progress
from .sources import FullCheckpointSource

AUX_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
             "added_tokens.json", "chat_template.jinja")


def _copy_aux(src: Path, dst: Path) -> None:
    for name in AUX_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _fill_unstored(source, entries, src: Path, model: nn.Module, config, dtype) -> None:
    """Refuse a checkpoint that lacks a parameter; compute the persistent buffers no checkpoint
    holds as loading does."""
    missing = [e for e in entries if not source.has(e)]
    if any(e.is_param for e in missing):
        names = [e.aliases[0] for e in missing if e.is_param]
        raise CheckpointError(f"the checkpoint in {src} lacks {names[:5]}")
    if missing:
        rebuild_non_persistent(model, torch.device("cpu"), config, type(model), dtype,
                               extra=frozenset(a for e in missing for a in e.aliases))


def _write_ranks(tmp: Path, ranks: list, source, tied: dict, pick, plan) -> dict:
    """One rank file per entry list of ``ranks``; returns the metadata's ``files``."""
    files = {}
    for r, entries in enumerate(ranks):
        items = [(export_name(e.aliases, tied), pick(e), e.local_shape) for e in entries]

        def tensor(i, entries=entries):
            e = entries[i]
            if e.zero:
                return torch.zeros(e.local_shape, dtype=pick(e))
            if source.has(e):
                return source.read(e, pick(e), torch.device("cpu"))
            return e.holders[0][0]._buffers[e.holders[0][1]]

        files[str(r)] = write_rank_file(tmp / rank_file(r, plan.tp_size), items, tensor, r, plan)
    return files


def preshard(model_dir: str | os.PathLike, out_dir: str | os.PathLike, tp_size: int,
             dtype: torch.dtype | str | None = None, rules: dict[str, str] | None = None,
             model_class: type | None = None, progress: bool | None = None) -> Path:
    """Write the pre-sharded folder for ``tp_size`` ranks from the full checkpoint in
    ``model_dir`` (one process, no process group). Same files as :func:`xtp.save_sharded`."""
    src, final = check_path(model_dir, "model_dir"), check_path(out_dir, "out_dir")
    check_tp_size(tp_size)
    if dtype != "auto":
        check_dtype(dtype)
    config = load_config(src)
    tmp = prepare_target(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with CheckpointIndex.open(src) as ckpt:
            stored = next((ckpt.info(k).dtype for k in ckpt.keys()
                           if ckpt.info(k).dtype.is_floating_point), None)
            dtype = resolve_dtype(dtype, config, stored)
            model = skeleton(config, model_class or saved_class(config), dtype)
            plan = derive_plan(model, tp_size, rules)
            source = FullCheckpointSource(ckpt, model)
            ranks = [local_entries(model, plan, r) for r in range(tp_size)]
            _fill_unstored(source, ranks[0], src, model, config, dtype)
            source.check(ranks[0])
            total = sum(source.cost(e) for entries in ranks for e in entries if source.has(e))
            bar = Progress.auto(progress, True, total, len(ckpt.files), "xtp preshard")
            ckpt.on_read = bar.update
            try:
                files = _write_ranks(tmp, ranks, source, tied_sources(model),
                                     entry_dtype(model, dtype), plan)
            finally:
                bar.close()
        save_config(config, tmp, dtype)
        _copy_aux(src, tmp)
        meta = metadata(plan, model, dtype, files, str(src), "xtp preshard")
        (tmp / METADATA).write_text(json.dumps(meta, indent=1))
        commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _revert(model: nn.Module) -> tuple[Callable[[dict], dict], Callable[[str], str]]:
    """transformers' save-time conversion (revert) and a key -> conversion-group function."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            apply_converters,
            revert_weight_conversion,
        )
    except ImportError:
        return (lambda sd: sd), (lambda k: k)
    try:
        rules = get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # noqa: BLE001
        rules = []
    reverse = [r.reverse_transform() for r in rules[::-1] if isinstance(r, WeightConverter)]

    def group(key: str) -> str:
        renamed, pattern = apply_converters(key, reverse)
        return renamed if pattern is not None else key

    return (lambda sd: revert_weight_conversion(model, sd)), group


def _split(items: list[tuple[str, torch.dtype, tuple]], max_bytes: int | None) -> list[list]:
    files, size = [[]], 0
    for it in items:
        n = torch.empty((), dtype=it[1]).element_size()
        for d in it[2]:
            n *= d
        if max_bytes and files[-1] and size + n > max_bytes:
            files.append([])
            size = 0
        files[-1].append(it)
        size += n
    return files


@dataclass
class _Layout:
    """What a gather writes: stored names, each tensor's full shape and output dtype, the
    groups transformers converts together, and the output tensors in write order."""

    names: list[str]
    full: dict[str, tuple[tuple[int, ...], torch.dtype]]
    groups: list[list[str]]
    outputs: list[tuple[str, torch.dtype, tuple]]


def _layout(model: nn.Module, reader: CheckpointIndex, src: Path, dtype, revert, group_of
            ) -> _Layout:
    """The output layout, from rank 0's file and a dry run of the conversion on meta tensors."""
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    names = [k for k in reader.keys() if k not in ignore]
    model_sd = model.state_dict()
    unknown = [k for k in names if k not in model_sd]
    if unknown:
        raise CheckpointError(f"{src} holds tensors the model does not: {unknown[:5]}")
    full = {}
    for name in names:
        info = reader.info(name)
        out_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        full[name] = (tuple(model_sd[name].shape), out_dtype)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(group_of(name), []).append(name)
    outputs = []
    for members in groups.values():
        fake = {k: torch.empty(full[k][0], dtype=full[k][1], device="meta") for k in members}
        outputs += [(k, v.dtype, tuple(v.shape)) for k, v in revert(fake).items()]
    return _Layout(names, full, list(groups.values()), outputs)


def _read_full(name: str, plan, readers: list[CheckpointIndex], layout: _Layout, bar
               ) -> torch.Tensor:
    """Tensor ``name`` whole, from the ranks' slices, in its output dtype."""
    split = param_split(plan, name)
    # replicated tensors, and those only rank 0 holds (zeros elsewhere): rank 0's copy
    ranks = [0] if split is None or split.zero_off_rank0 else range(len(readers))
    pieces = []
    for r in ranks:
        pieces.append(readers[r].read(name))
        bar.update(pieces[-1].numel() * pieces[-1].element_size(), r)
    t = pieces[0]
    shape, out_dtype = layout.full[name]
    if split is not None:
        t = gather_ranges(pieces, split.dim, [split.ranges[r] for r in ranks], shape[split.dim])
    return t.to(out_dtype)


def _write_full(tmp: Path, layout: _Layout, read, revert, max_shard_size: int | None) -> None:
    """The output safetensors file(s), and an index when there are several."""
    chunks = _split(layout.outputs, max_shard_size)
    fnames = (["model.safetensors"] if len(chunks) == 1 else
              [f"model-{i + 1:05d}-of-{len(chunks):05d}.safetensors" for i in range(len(chunks))])
    writers = [StreamWriter(tmp / f, c, {"format": "pt"}) for f, c in zip(fnames, chunks)]
    where = {it[0]: w for w, c in zip(writers, chunks) for it in c}
    try:
        for members in layout.groups:
            for k, v in revert({k: read(k) for k in members}).items():
                where[k].write(k, v.contiguous())
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    if len(chunks) > 1:
        index = {"metadata": {"total_size": sum(
            torch.empty((), dtype=d).element_size() * int(torch.Size(s).numel())
            for _, d, s in layout.outputs)},
            "weight_map": {it[0]: f for f, c in zip(fnames, chunks) for it in c}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def gather(src_dir: str | os.PathLike, out_dir: str | os.PathLike,
           max_shard_size: int | None = None, dtype: torch.dtype | None = None,
           progress: bool | None = None) -> Path:
    """Stream the pre-sharded folder ``src_dir`` back into one ordinary checkpoint in
    ``out_dir`` (offline, one process). ``max_shard_size`` (bytes) splits the output into
    several files with an index; ``dtype`` converts floating-point tensors."""
    src, final = check_path(src_dir, "src_dir"), check_path(out_dir, "out_dir")
    dtype = check_dtype(dtype)
    meta = read_metadata(src)
    plan = plan_from_json(meta["plan"])
    n = plan.tp_size
    config = load_config(src)
    stored = getattr(torch, meta["dtype"])
    model = skeleton(config, saved_model_class(meta.get("model_class")), stored)
    revert, group_of = _revert(model)
    readers = [CheckpointIndex(src, [src / rank_file(r, n)], "safetensors", {}) for r in range(n)]
    try:
        layout = _layout(model, readers[0], src, dtype, revert, group_of)
        if final.exists() and any(final.iterdir()):
            raise CheckpointError(f"{final} is not empty; gather writes a new folder")
        tmp = temp_folder(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        total = sum(r.info(k).nbytes for r in readers for k in layout.names)
        bar = Progress.auto(progress, True, total, n, "xtp gather")
        try:
            _write_full(tmp, layout, lambda k: _read_full(k, plan, readers, layout, bar),
                        revert, max_shard_size)
            bar.close()
            save_config(config, tmp, resolve_dtype(dtype, None, stored))
            _copy_aux(src, tmp)
            if final.exists():
                final.rmdir()
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        for r in readers:
            r.close()
    return final
