"""Rank-side code of the loading tests (runs inside RankPool ranks), and checkpoint helpers.

Checkpoints are written by the pytest process (:func:`save_case`), the ranks read them. Every
rank function returns plain data (lists, numbers) that the test asserts on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from parity_cases import CASES
from xtp.models.build import meta_model

#: on transformers 4.x the planner's probe of a *meta* model fails for rotary models (their
#: rotary forward calls torch.autocast(device_type="meta")), so nothing can be planned from a
#: config there yet; xtp.shard() of a loaded model is not affected
needs_meta_planning = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="planning a meta model needs transformers >= 5 (probe: autocast on 'meta')")


def auto_class(kind: str):
    import transformers

    return {"causal": transformers.AutoModelForCausalLM,
            "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "encoder": transformers.AutoModel}[kind]


def case_by_id(case_id: str):
    return next(c for c in CASES if c.id == case_id)


def build_case(case_id: str, dtype: torch.dtype | None = None):
    """The parity suite's tiny random model for ``case_id`` (seed 0), in eval mode."""
    case = case_by_id(case_id)
    torch.manual_seed(0)
    model = auto_class(case.kind).from_config(case.config())
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_case(case_id: str, folder: Path, dtype: torch.dtype | None = None, **kwargs) -> Path:
    """Write ``case_id``'s model with ``save_pretrained`` (kwargs: e.g. max_shard_size)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    build_case(case_id, dtype).save_pretrained(str(folder), **kwargs)
    return folder


def _inputs(kind: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 101, (2, 7), generator=g)
    return {"input_ids": ids, "decoder_input_ids": ids[:, :3]} if kind == "seq2seq" else {
        "input_ids": ids}


def output(model, kind: str) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in _inputs(kind).items()})
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under every name (tied aliases included)."""
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(dict(model.named_buffers(remove_duplicate=False)))
    return out


def differences(a, b) -> list[str]:
    """What differs between two sharded models: tensors (bitwise, dtype, ties), module
    classes and the scalar attributes shard() sets."""
    diffs = []
    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        diffs.append(f"names differ: {sorted(set(ta) ^ set(tb))[:5]}")
    for k in sorted(set(ta) & set(tb)):
        x, y = ta[k], tb[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            diffs.append(f"{k}: {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}")
    ids_a = {k: id(v) for k, v in ta.items()}
    ids_b = {k: id(v) for k, v in tb.items()}
    for k in ids_a:
        for j in ids_a:
            if k < j and k in ids_b and j in ids_b and (
                    (ids_a[k] == ids_a[j]) != (ids_b[k] == ids_b[j])):
                diffs.append(f"tie differs: {k} / {j}")
    ma, mb = dict(a.named_modules()), dict(b.named_modules())
    for name, mod in ma.items():
        other = mb.get(name)
        if other is None or type(mod) is not type(other):
            diffs.append(f"module {name}: {type(mod).__name__} vs {type(other).__name__}")
            continue
        for attr, v in vars(mod).items():
            if isinstance(v, (int, float, str, bool, tuple)) and not attr.startswith("_") \
                    and attr != "name_or_path":
                if vars(other).get(attr) != v:
                    diffs.append(f"{name}.{attr}: {v!r} vs {vars(other).get(attr)!r}")
    return diffs


def _local_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for _, b in _persistent_buffers(model)]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _persistent_buffers(model):
    for mname, mod in model.named_modules():
        for bname, b in mod._buffers.items():
            if b is not None and bname not in mod._non_persistent_buffers_set:
                yield f"{mname}.{bname}", b


def _stored_element_sizes(folder: str) -> dict[str, int]:
    """Bytes per element of every tensor as stored in the folder's safetensors files."""
    from safetensors import safe_open

    sizes = {}
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                dtype = f.get_slice(name).get_dtype()
                sizes[name] = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}.get(dtype, 4)
    return sizes


def load_and_compare(case_id: str, folder: str, tp: int, out: str | None = None,
                     dtype: torch.dtype | None = None) -> dict:
    """from_pretrained vs shard(transformers from_pretrained); then (with ``out``)
    save_sharded -> from_pretrained(out) vs the first load. Runs on every rank."""
    import xtp
    from xtp.loading.entries import local_entries

    case = case_by_id(case_id)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    ref = auto_class(case.kind).from_pretrained(folder, **kwargs)
    xtp.shard(ref, tp_size=tp)
    got = xtp.from_pretrained(folder, tp_size=tp, model_class=auto_class(case.kind), **kwargs)
    want, have = output(ref, case.kind), output(got, case.kind)
    report = xtp.load_report(got)
    plan = got._xtp_plan
    rank = got._xtp_context.tp_rank
    # bytes: each sharded tensor read as exactly its slice, never whole
    meta = meta_model(got.config, type(got), got.dtype)
    stored = _stored_element_sizes(folder)
    # tensors converted on load (per-expert keys fused into one parameter) have no stored key
    # of their own: judge them in the checkpoint's widest dtype
    stored_default = max(stored.values(), default=4)
    whole, zero_bytes = [], 0
    for e in local_entries(meta, plan, rank):
        size = torch.empty((), dtype=e.meta.dtype).element_size()
        if e.zero:
            zero_bytes += torch.Size(e.local_shape).numel() * size
        elif e.dim is not None and e.local_shape != e.full_shape:
            # "whole" in the checkpoint's own dtype (a load may convert, e.g. fp32 -> bf16)
            file_size = stored.get(e.aliases[0], stored_default)
            if report.per_tensor.get(e.aliases[0], 0) >= e.meta.numel() * file_size:
                whole.append(e.aliases[0])
    result = {
        "diffs": differences(ref, got),
        "rel_err": float((have - want).norm() / want.norm()),
        "bytes_read": report.bytes_read, "plan_bytes": plan.bytes_per_rank(rank),
        "local_bytes": _local_bytes(got) - zero_bytes, "whole_sharded": whole,
        "files": report.files_opened,
    }
    if out is not None:
        xtp.save_sharded(got, out)
        again = xtp.from_pretrained(out, tp_size=tp, **kwargs)
        result["presharded_diffs"] = differences(got, again)
        result["presharded_files"] = xtp.load_report(again).files_opened
        result["presharded_equal_output"] = bool(torch.equal(output(again, case.kind), have))
    return result


def gpu_load(case_id: str, folder: str, tp: int, dtype_name: str) -> dict:
    """:func:`load_and_compare` on this rank's device (a GPU), plus where the tensors are and
    how much device memory a second, fresh load takes."""
    import xtp

    dtype = getattr(torch, dtype_name)
    result = load_and_compare(case_id, folder, tp, dtype=dtype)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = xtp.from_pretrained(folder, tp_size=tp, dtype=dtype,
                                model_class=auto_class(case_by_id(case_id).kind))
    result["devices"] = sorted({str(t.device) for t in tensors(model).values()})
    result["cuda_peak"] = torch.cuda.max_memory_allocated() - before
    result["cuda_held"] = torch.cuda.memory_allocated() - before
    result["model_bytes"] = _local_bytes(model)
    return result


def load_per_rank_folder(folders: list[str], tp: int) -> str:
    """Rank r loads ``folders[r]``; returns the error's class name (or "loaded")."""
    import os

    import xtp

    try:
        xtp.from_pretrained(folders[int(os.environ["RANK"])], tp_size=tp)
    except Exception as exc:  # noqa: BLE001 - the test asserts on it
        return f"{type(exc).__name__}: {exc}"
    return "loaded"
