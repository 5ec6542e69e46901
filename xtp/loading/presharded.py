"""Pre-sharded checkpoints: one safetensors file per TP rank, plus the plan that made them.

Folder layout (written atomically: into a hidden temporary folder, then renamed into place;
``.xtp_complete`` is written last, so a folder without it is never loaded)::

    config.json                  the full (unsharded) model config, dtype = the stored dtype
    generation_config.json       when the model has one
    xtp_metadata.json            format, tp_size, dtype, model class, the full plan (JSON), its
                                 fingerprint, per-rank file names and sizes, versions, source
    rank-{r}-of-{n}.safetensors  rank r's tensors under the model's state-dict names (tied
                                 weights once, under the tie source's name), already sliced
    .xtp_complete

``save_sharded(model, dir)`` writes it from a sharded model (every rank writes its own file);
``xtp preshard`` writes the same files from a full checkpoint in one process
(:func:`xtp.export.preshard`). ``from_pretrained(dir)`` reads this rank's file only and reuses
the stored plan; ``xtp.gather`` turns the folder back into an ordinary checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..accelerators import Communicator
from ..distributed.setup import TPContext
from ..errors import CheckpointError, XtpError
from ..formats.checkpoint_index import CheckpointIndex
from ..formats.keymap import choose_alias, tied_sources
from ..formats.safetensors_io import StreamWriter, read_header
from ..planning.serialize import fingerprint, plan_from_json, plan_to_json
from ..planning.spec import ShardPlan
from ..sharding.assemble import Entry, finish_sharding, local_entries
from ..sharding.packing import require_dense
from .api import REPORT_ATTR, _generation_config, fill_model, load_config, resolve_dtype, skeleton

FORMAT, FORMAT_VERSION = "xtp-presharded", 1
METADATA, MARKER = "xtp_metadata.json", ".xtp_complete"


def rank_file(rank: int, tp_size: int) -> str:
    return f"rank-{rank}-of-{tp_size}.safetensors"


def is_presharded(folder: Path) -> bool:
    return (Path(folder) / METADATA).is_file()


def read_metadata(folder: Path) -> dict:
    """``xtp_metadata.json`` of a complete pre-sharded folder (CheckpointError otherwise)."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise CheckpointError(f"{folder} is an incomplete pre-sharded folder (no {MARKER}): its "
                              "writing was interrupted; write it again")
    meta = json.loads((folder / METADATA).read_text())
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder / METADATA} is format {meta.get('format')!r} version "
                              f"{meta.get('format_version')}; this xtp reads {FORMAT} version "
                              f"<= {FORMAT_VERSION}: upgrade xtp")
    return meta


def _versions() -> dict:
    import safetensors
    import transformers

    from .._version import __version__
    return {"xtp": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__}


def export_name(entry: Entry, tied: dict[str, str]) -> str:
    """The one name a (possibly tied) tensor is stored under."""
    return choose_alias(entry.aliases, lambda a: True, tied)


def metadata(plan: ShardPlan, model: nn.Module, dtype: torch.dtype, files: dict,
             source: str | None, created_by: str) -> dict:
    cls = type(model)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "tp_size": plan.tp_size, "model_type": plan.model_type,
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "dtype": str(dtype).removeprefix("torch."),
        "plan_fingerprint": fingerprint(plan),
        "files": files, "tied": tied_sources(model), "source": source,
        "created_by": created_by, "versions": _versions(),
        "plan_summary": plan.to_dict(), "plan": plan_to_json(plan),
    }


def write_rank_file(path: Path, items: Sequence[tuple[str, torch.dtype, tuple]],
                    tensors: Callable[[int], torch.Tensor], rank: int, plan: ShardPlan) -> dict:
    """Stream one rank's tensors (``tensors(i)`` gives item ``i``) into ``path``."""
    w = StreamWriter(path, items, {"format": "pt", "xtp_rank": rank, "xtp_tp_size": plan.tp_size,
                                   "xtp_plan_fingerprint": fingerprint(plan)})
    try:
        for i, (name, dtype, _) in enumerate(items):
            w.write(name, tensors(i).to(dtype))
        w.close()
    except BaseException:
        w.abort()
        raise
    return {"file": path.name, "bytes": path.stat().st_size, "tensors": len(items)}


def save_config(config, folder: Path, dtype: torch.dtype) -> None:
    config = copy.deepcopy(config)
    config.dtype = dtype
    config.save_pretrained(str(folder))


def prepare_target(final: Path) -> Path:
    """Check ``final`` may be (re)written; return the temporary folder to write into."""
    if final.exists() and not (final.is_dir() and (not any(final.iterdir())
                                                   or is_presharded(final))):
        raise CheckpointError(f"refusing to overwrite {final}: it exists and is not an xtp "
                              "pre-sharded folder; choose another folder or remove it")
    return final.parent / f".{final.name}.xtp-tmp"


def commit(tmp: Path, final: Path) -> None:
    """Mark ``tmp`` complete and move it to ``final`` (replacing an old pre-sharded folder)."""
    (tmp / MARKER).write_text("ok\n")
    old = final.parent / f".{final.name}.xtp-old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _all_ok(ok: bool, ctx: TPContext) -> bool:
    """True when every rank of the world says ok (a barrier that carries failures)."""
    if not dist.is_initialized() or ctx.world_size == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save_sharded(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None
                 ) -> Path:
    """Write this TP group's shards of ``model`` to ``path`` (collective: call on every rank).

    ``model`` must come from :func:`xtp.shard` or :func:`xtp.from_pretrained`. Each TP rank
    of data-parallel replica 0 writes its own ``rank-{r}-of-{n}.safetensors``; global rank 0
    writes the config and metadata and moves the folder into place. ``dtype`` converts on
    write (default: as held). The folder must be on a file system every rank sees.
    """
    from ..sharding.api import CONTEXT_ATTR, sharded_plan

    plan, ctx = sharded_plan(model), getattr(model, CONTEXT_ATTR, None)
    if plan is None or ctx is None:
        raise XtpError("save_sharded needs a model sharded by xtp.shard() or loaded by "
                       "xtp.from_pretrained(); use model.save_pretrained() for an unsharded one")
    require_dense(model, "xtp.save_sharded")
    final = Path(path)
    tmp = prepare_target(final)
    leader = ctx.rank == 0
    error = None
    if leader:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if not _all_ok(True, ctx):
        raise CheckpointError("another rank failed before writing")
    tied = tied_sources(model)
    entries = local_entries(model, None, ctx.tp_rank)
    # each tensor as held (keep-in-fp32 modules stay fp32) unless a dtype is asked for
    items = [(export_name(e, tied), dtype if dtype is not None and e.meta.is_floating_point()
              else e.meta.dtype, tuple(e.meta.shape)) for e in entries]
    held = getattr(model.config, "dtype", None)
    if not isinstance(held, torch.dtype):
        held = next((e.meta.dtype for e in entries if e.meta.is_floating_point()), torch.float32)
    dtype = dtype or held
    try:
        if ctx.dp_rank == 0:
            write_rank_file(tmp / rank_file(ctx.tp_rank, ctx.tp_size), items,
                            lambda i: entries[i].meta.detach(), ctx.tp_rank, plan)
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        error = exc
    if not _all_ok(error is None, ctx):
        raise CheckpointError(f"writing {final} failed on some rank"
                              + (f": {error}" if error else "")) from error
    if leader:
        try:
            files = {str(r): {"file": rank_file(r, ctx.tp_size),
                              "bytes": (tmp / rank_file(r, ctx.tp_size)).stat().st_size}
                     for r in range(ctx.tp_size)}
            save_config(model.config, tmp, dtype)
            gen = getattr(model, "generation_config", None)
            if gen is not None and getattr(model, "can_generate", lambda: False)():
                gen.save_pretrained(str(tmp))
            meta = metadata(plan, model, dtype, files,
                            getattr(model.config, "_name_or_path", None), "xtp.save_sharded")
            (tmp / METADATA).write_text(json.dumps(meta, indent=1))
            commit(tmp, final)
        except Exception as exc:  # noqa: BLE001
            error = exc
    if not _all_ok(error is None, ctx):
        raise CheckpointError(f"finishing {final} failed" + (f": {error}" if error else "")
                              ) from error
    return final


def _import_class(path: str | None) -> type | None:
    if not path or "." not in path:
        return None
    import importlib

    mod, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError):
        return None


def load_presharded(folder: Path, ctx: TPContext, dtype, model_class: type | None,
                    rules: dict | None, progress: bool | None,
                    communicator: Communicator | Callable | None) -> nn.Module:
    """This rank's file of a pre-sharded folder, with the stored plan (see the module doc)."""
    from ..planning.derive import derive_plan
    from .sources import RankFileSource

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
    model = skeleton(config, model_class or _import_class(meta.get("model_class")), dtype)
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
    finish_sharding(model, plan, ctx, communicator)
    _generation_config(model, folder)
    model.eval()
    setattr(model, REPORT_ATTR, report)
    return model
