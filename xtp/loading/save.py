"""``xtp.save_sharded(model, dir)``: every rank writes its own file of a pre-sharded folder.

The folder format is :mod:`xtp.formats.presharded`; ``from_pretrained(dir)`` loads it back
(:mod:`xtp.loading.presharded`), ``xtp gather`` turns it into an ordinary checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..distributed.consistency import all_ranks_ok
from ..errors import CheckpointError, XtpError
from ..formats.keymap import tied_sources
from ..formats.presharded import (
    METADATA,
    commit,
    export_name,
    metadata,
    prepare_target,
    rank_file,
    save_config,
    write_rank_file,
)
from ..sharding.packing import require_dense
from ..sharding.state import sharded_context, sharded_plan
from .entries import local_entries


def _finish_folder(model: nn.Module, plan, tmp: Path, final: Path, dtype: torch.dtype) -> None:
    """Global rank 0, once every rank file is written: config, generation config, metadata,
    then the atomic move into place."""
    n = plan.tp_size
    files = {str(r): {"file": rank_file(r, n), "bytes": (tmp / rank_file(r, n)).stat().st_size}
             for r in range(n)}
    save_config(model.config, tmp, dtype)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(str(tmp))
    meta = metadata(plan, model, dtype, files,
                    getattr(model.config, "_name_or_path", None), "xtp.save_sharded")
    (tmp / METADATA).write_text(json.dumps(meta, indent=1))
    commit(tmp, final)


def save_sharded(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None
                 ) -> Path:
    """Write this TP group's shards of ``model`` to ``path`` (collective: call on every rank).

    ``model`` must come from :func:`xtp.shard` or :func:`xtp.from_pretrained`. Each TP rank
    of data-parallel replica 0 writes its own ``rank-{r}-of-{n}.safetensors``; global rank 0
    writes the config and metadata and moves the folder into place. ``dtype`` converts on
    write (default: as held). The folder must be on a file system every rank sees.
    """
    plan, ctx = sharded_plan(model), sharded_context(model)
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
    if not all_ranks_ok(True, ctx, f"save_sharded({final}) before writing"):
        raise CheckpointError("another rank failed before writing")
    tied = tied_sources(model)
    entries = local_entries(model, None, ctx.tp_rank)
    # each tensor as held (keep-in-fp32 modules stay fp32) unless a dtype is asked for
    items = [(export_name(e.aliases, tied),
              dtype if dtype is not None and e.meta.is_floating_point() else e.meta.dtype,
              tuple(e.meta.shape)) for e in entries]
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
    if not all_ranks_ok(error is None, ctx, f"save_sharded({final}) after the rank files"):
        raise CheckpointError(f"writing {final} failed on some rank"
                              + (f": {error}" if error else "")) from error
    if leader:
        try:
            _finish_folder(model, plan, tmp, final, dtype)
        except Exception as exc:  # noqa: BLE001
            error = exc
    if not all_ranks_ok(error is None, ctx, f"save_sharded({final}) finishing the folder"):
        raise CheckpointError(f"finishing {final} failed" + (f": {error}" if error else "")
                              ) from error
    return final
