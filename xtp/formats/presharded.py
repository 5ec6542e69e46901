"""The pre-sharded folder format: one safetensors file per TP rank, plus the plan that made them.

Folder layout (written atomically: into a hidden temporary folder, then renamed into place;
``.xtp_complete`` is written last, so a folder without it is never loaded)::

    config.json                  the full (unsharded) model config, dtype = the stored dtype
    generation_config.json       when the model has one
    xtp_metadata.json            format, tp_size, dtype, model class, the full plan (JSON), its
                                 fingerprint, per-rank file names and sizes, versions, source
    rank-{r}-of-{n}.safetensors  rank r's tensors under the model's state-dict names (tied
                                 weights once, under the tie source's name), already sliced
    .xtp_complete

Writers: :func:`xtp.save_sharded` (:mod:`xtp.loading.save`, every rank writes its own file) and
``xtp preshard`` (:func:`xtp.loading.offline.preshard`, one process). Readers:
``from_pretrained(dir)`` (:mod:`xtp.loading.presharded`: this rank's file only, the stored plan)
and ``xtp gather`` (back to an ordinary checkpoint). This module holds only the format: names,
metadata, one rank file, and the atomic commit.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, NotPreshardedError
from ..planning.serialize import fingerprint, plan_from_json, plan_to_json
from ..planning.spec import ShardPlan
from .json_object import read_json_object
from .keymap import choose_alias, tied_sources
from .safetensors_io import StreamWriter

FORMAT, FORMAT_VERSION = "xtp-presharded", 1
METADATA, MARKER = "xtp_metadata.json", ".xtp_complete"


def rank_file(rank: int, tp_size: int) -> str:
    return f"rank-{rank}-of-{tp_size}.safetensors"


def is_presharded(folder: Path) -> bool:
    return (Path(folder) / METADATA).is_file()


def read_metadata(folder: Path) -> dict:
    """``xtp_metadata.json`` of a complete pre-sharded folder.

    Raises:
        NotPreshardedError: ``folder`` is missing, not a folder, or has no ``xtp_metadata.json``
            (an ordinary checkpoint, say); the message says what the caller expects instead.
        CheckpointError: the folder's writing was interrupted (no ``.xtp_complete``), or its
            metadata is not valid JSON, is another format, or lacks a field readers need.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotPreshardedError(f"{folder} is not a folder; give a pre-sharded folder (written "
                                 "by xtp preshard or xtp.save_sharded)")
    if not is_presharded(folder):
        kind = ("an ordinary checkpoint folder (config.json, no " + METADATA + ")"
                if (folder / "config.json").is_file() else f"not one (no {METADATA})")
        raise NotPreshardedError(
            f"{folder} is not a pre-sharded folder: it is {kind}; this needs a folder written "
            "by xtp preshard or xtp.save_sharded (from_pretrained loads an ordinary checkpoint "
            "folder directly)")
    if not (folder / MARKER).is_file():
        raise CheckpointError(f"{folder} is an incomplete pre-sharded folder (no {MARKER}): its "
                              "writing was interrupted; write it again")
    meta = read_json_object(folder / METADATA, "the folder is damaged: write it again")
    if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int) \
            or meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{folder / METADATA} is format {meta.get('format')!r} version "
                              f"{meta.get('format_version')!r}; this xtp reads {FORMAT} version "
                              f"<= {FORMAT_VERSION}: upgrade xtp, or write the folder again")
    bad = [k for k, kind in _FIELDS.items() if not isinstance(meta.get(k), kind)]
    if not bad and (meta["tp_size"] < 1 or isinstance(meta["tp_size"], bool)):
        bad = ["tp_size"]
    if not bad and not isinstance(getattr(torch, meta["dtype"], None), torch.dtype):
        bad = ["dtype"]
    if not bad and not all(isinstance(e, dict) and isinstance(e.get("file"), str)
                           and Path(e["file"]).name == e["file"]
                           for e in (meta["files"].get(str(r)) for r in range(meta["tp_size"]))):
        bad = ["files"]
    if not bad:
        try:
            plan_from_json(meta["plan"])
        except Exception:  # any damage to the stored plan
            bad = ["plan"]
    if bad:
        raise CheckpointError(f"{folder / METADATA} is damaged (field {', '.join(bad)} missing "
                              "or of the wrong type or value); write the folder again")
    return meta


#: the fields of ``xtp_metadata.json`` readers rely on, and their JSON types
_FIELDS = {"tp_size": int, "dtype": str, "plan": dict, "plan_fingerprint": str, "files": dict}


def _versions() -> dict:
    import safetensors
    import transformers

    from .._version import __version__
    return {"xtp": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__}


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


def temp_folder(final: Path) -> Path:
    """The hidden folder a pre-sharded folder is written into before it is moved to ``final``."""
    return final.parent / f".{final.name}.xtp-tmp"


def old_folder(final: Path) -> Path:
    """Where the previous ``final`` waits while a new one is moved into place."""
    return final.parent / f".{final.name}.xtp-old"


def leftovers(final: Path) -> list[str]:
    """Names of the temporary folders an interrupted write of ``final`` left next to it."""
    return [p.name for p in (temp_folder(final), old_folder(final)) if p.exists()]


def prepare_target(final: Path) -> Path:
    """Check ``final`` may be (re)written; return the temporary folder to write into."""
    if final.exists() and not (final.is_dir() and (not any(final.iterdir())
                                                   or is_presharded(final))):
        raise CheckpointError(f"refusing to overwrite {final}: it exists and is not an xtp "
                              "pre-sharded folder; choose another folder or remove it")
    return temp_folder(final)


def commit(tmp: Path, final: Path) -> None:
    """Mark ``tmp`` complete and move it to ``final`` (replacing an old pre-sharded folder)."""
    (tmp / MARKER).write_text("ok\n")
    old = old_folder(final)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def export_name(aliases: Sequence[str], tied: dict[str, str]) -> str:
    """The one name a (possibly tied) tensor is stored under, from its state-dict ``aliases``."""
    return choose_alias(aliases, lambda a: True, tied)
