"""What both loading paths share (a full checkpoint, :mod:`xtp.loading.api`, and a pre-sharded
folder, :mod:`xtp.loading.presharded`): reading the config, the meta skeleton, the dtype rules,
filling every tensor with this rank's slice, and finishing the model (plan applied to the
loaded slices, generation config, eval mode, :class:`LoadReport`).

Peak memory per rank: this rank's shard plus the replicated tensors, plus one tensor's
temporary for a device copy, a ``.bin`` file or a tensor transformers builds from several
stored ones; a safetensors slice read in another dtype is converted 4 MiB at a time
(:func:`xtp.formats.safetensors_io.read_tensor`). bench/RESULTS.md has the measured figures.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..distributed.consistency import check_fingerprints, checkpoint_digest, fingerprint
from ..distributed.context import TPContext
from ..distributed.setup import init_distributed
from ..errors import CheckpointError, TPSizeError
from ..formats.checkpoint_index import ReadStats
from ..models.build import meta_model
from ..models.inputs import check_dtype
from ..planning.spec import ShardPlan
from ..sharding.apply import adopt_local_shards
from ..sharding.state import REPORT_ATTR
from .buffers import rebuild_non_persistent
from .entries import Entry, local_entries
from .progress import Progress


@dataclass
class LoadReport:
    """What loading did on this rank (also attached to the model: :func:`load_report`)."""

    folder: str
    tp_rank: int
    tp_size: int
    bytes_read: int
    expected_bytes: int
    per_key: dict[str, int] = field(default_factory=dict)
    per_tensor: dict[str, int] = field(default_factory=dict)
    files_opened: list[str] = field(default_factory=list)
    rebuilt_buffers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    presharded: bool = False


def load_report(model: nn.Module) -> LoadReport | None:
    """The :class:`LoadReport` of a model made by :func:`from_pretrained`, else ``None``."""
    return getattr(model, REPORT_ATTR, None)


def load_config(folder: Path):
    """``config.json`` of ``folder`` through transformers' ``AutoConfig`` (local, no hub),
    checked: :func:`xtp.models.config.load_folder_config` (ConfigError when bad)."""
    from ..models.config import load_folder_config

    return load_folder_config(folder)


def skeleton(config, model_class: type | None, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device in ``dtype``. :func:`xtp.models.build.meta_model` ignores
    ``dtype`` for a concrete transformers class (it has ``_from_config``, not ``from_config``),
    so such classes are built through ``_from_config`` here."""
    if model_class is not None and hasattr(model_class, "_from_config") and not hasattr(
            model_class, "from_config"):
        with torch.device("meta"):
            return model_class._from_config(config, dtype=dtype)
    return meta_model(config, model_class, dtype)


def saved_class(config) -> type | None:
    """The class named in ``config.architectures`` (what was saved), when transformers has it."""
    archs = getattr(config, "architectures", None) or []
    if len(archs) != 1:
        return None
    import transformers

    cls = getattr(transformers, archs[0], None)
    return cls if isinstance(cls, type) else None


def resolve_dtype(dtype, config, stored: torch.dtype | None) -> torch.dtype:
    """An explicit dtype wins; ``None`` or ``"auto"``: the config's dtype, else the stored one.

    Raises:
        ArgumentError: ``dtype`` is neither ``None``/``"auto"`` nor a floating-point dtype
            (or its name) — :func:`xtp.models.inputs.check_dtype`.
    """
    explicit = None if dtype == "auto" else check_dtype(dtype)
    if explicit is not None:
        return explicit
    cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg, str) and isinstance(getattr(torch, cfg, None), torch.dtype):
        cfg = getattr(torch, cfg)
    if isinstance(cfg, torch.dtype):
        return cfg
    return stored or torch.get_default_dtype()


def entry_dtype(model: nn.Module, dtype: torch.dtype) -> Callable[[Entry], torch.dtype]:
    """The dtype each tensor is loaded in: the skeleton's, except where transformers' keep-in-
    fp32 rules force float32 (as its own loader does)."""
    forced = _dtype_rule(model, dtype)

    def pick(e: Entry) -> torch.dtype:
        return (forced(e.aliases[0]) if e.meta.is_floating_point() else None) or e.meta.dtype

    return pick


def _dtype_rule(model: nn.Module, dtype: torch.dtype) -> Callable[[str], torch.dtype | None]:
    """transformers' ``_keep_in_fp32_modules`` rules: name -> forced dtype (or None)."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return lambda name: None
    pats = list(plan)
    rx = re.compile("|".join(f"(?P<g{i}>{p})" for i, p in enumerate(pats)))

    def rule(name: str) -> torch.dtype | None:
        m = rx.search(name)
        return plan[pats[int(m.lastgroup[1:])]] if m else None

    return rule


def context_for(context: TPContext | None, tp_size: int | None) -> TPContext:
    ctx = context or init_distributed(tp_size)
    if tp_size is not None and ctx.tp_size != tp_size:
        raise TPSizeError(f"tp_size={tp_size} but the given context has tp_size={ctx.tp_size}")
    return ctx


def fill_model(model: nn.Module, plan: ShardPlan, ctx: TPContext, source, folder: Path,
               dtype: torch.dtype, progress: bool | None, stats: ReadStats) -> LoadReport:
    """Read every entry of ``model`` from ``source`` for ``ctx.tp_rank`` (in place)."""
    start = time.monotonic()
    if ctx.tp_size > 1:  # as shard() does: every rank has the same model, plan and versions
        check_fingerprints({**fingerprint(model, plan),  # ... and reads the same checkpoint
                            "checkpoint contents": checkpoint_digest(folder)}, ctx.tp_group)
    entries: list[Entry] = local_entries(model, plan, ctx.tp_rank)
    missing = [e for e in entries if not source.has(e)]
    missing_params = [e.aliases[0] for e in missing if e.is_param]
    if missing_params:
        raise CheckpointError(
            f"the checkpoint in {folder} lacks {len(missing_params)} tensor(s) the model needs: "
            f"{missing_params[:5]}. It was saved from another model or config, or is "
            "incomplete; check config.json (architectures, sizes) or re-save the checkpoint")
    source.check(entries)
    present = [e for e in entries if source.has(e)]
    total = sum(source.cost(e) for e in present)
    bar = Progress.auto(progress, ctx.rank == 0, total, len(source.files_for(present)))
    source.ckpt.on_read = bar.update
    pick = entry_dtype(model, dtype)
    per_tensor = {}
    try:
        for e in present:
            want = pick(e)
            before = stats.bytes_read
            if e.zero:  # this rank holds zeros (a bias the all-reduce must add once)
                e.set(torch.zeros(e.local_shape, dtype=want, device=ctx.device))
            else:
                e.set(source.read(e, want, ctx.device))
            per_tensor[e.aliases[0]] = stats.bytes_read - before
    finally:
        source.ckpt.on_read = None
        bar.close()
    missing_buffers = frozenset(a for e in missing for a in e.aliases)
    rebuilt = rebuild_non_persistent(model, ctx.device, model.config, type(model), dtype,
                                     extra=missing_buffers)
    return LoadReport(str(folder), ctx.tp_rank, ctx.tp_size, stats.bytes_read, total,
                      dict(stats.per_key), per_tensor, list(stats.files_opened), rebuilt,
                      time.monotonic() - start)


def _generation_config(model: nn.Module, folder: Path) -> None:
    if (folder / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        try:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        except (OSError, ValueError):
            pass




def finish_load(model: nn.Module, plan: ShardPlan, ctx: TPContext, communicator,
                folder: Path, report: LoadReport) -> nn.Module:
    """Apply ``plan`` to ``model`` (every tensor already this rank's slice), read the folder's
    generation config, switch to eval mode and attach ``report``."""
    adopt_local_shards(model, plan, ctx, communicator)
    _generation_config(model, folder)
    model.eval()
    setattr(model, REPORT_ATTR, report)
    return model
