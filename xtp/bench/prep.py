"""What ``xtp bench`` prepares before starting ranks: a checkpoint folder to load and the weight
bytes a decode step reads (the numerator of the decode floor; the ranks measure the read
bandwidth themselves, :func:`xtp.bench.rank.read_bandwidth`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

MARKER = "xtp-bench.json"


def _source_spec(model: str) -> tuple[str, dict]:
    """(short name, identity) of a built-in name or a config JSON file."""
    from ..models.builtin import BUILTIN_CONFIGS, SEED

    if model in BUILTIN_CONFIGS:
        spec = BUILTIN_CONFIGS[model]
        name = model
    else:
        with open(model) as f:
            spec = json.load(f)
        name = Path(model).stem
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return name, {"source": model if model in BUILTIN_CONFIGS else os.path.abspath(model),
                  "config_sha1": digest, "seed": SEED}


def checkpoint_for(model: str, dtype_name: str, cache_dir: Path, log=print) -> Path:
    """A checkpoint folder for MODEL in ``dtype_name``.

    A folder is used as it is (the loaders convert the dtype). A built-in name or a config
    JSON is saved once with seeded random weights (built in float32, stored in the dtype) to
    ``cache_dir/<name>-<dtype>/`` and reused while its config and seed are unchanged.
    """
    if os.path.isdir(model):
        return Path(model)
    import torch

    from ..models.builtin import build_random, resolve_config

    name, ident = _source_spec(model)
    ident["dtype"] = dtype_name
    folder = Path(cache_dir) / f"{name}-{dtype_name}"
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == ident:
        return folder
    log(f"saving {model} with seeded random weights ({dtype_name}) to {folder} (once)")
    t = time.time()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model_obj = build_random(resolve_config(model), torch.float32).to(getattr(torch, dtype_name))
    model_obj.save_pretrained(str(tmp))
    del model_obj
    (tmp / MARKER).write_text(json.dumps(ident))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log(f"saved in {time.time() - t:.0f} s")
    return folder


def weight_bytes(path: Path, dtype_name: str) -> tuple[int, int]:
    """(all parameter bytes, bytes one decode step reads) of the model in ``path`` held in
    ``dtype_name``: a step reads every weight except the input embedding table, of which it
    reads one row (the KV cache read is left out: a few MB here)."""
    import torch

    from ..models.build import meta_model
    from ..models.builtin import resolve_config

    model = meta_model(resolve_config(str(path)), None, getattr(torch, dtype_name))
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    emb = model.get_input_embeddings().weight
    tied = any(p is emb for p in (getattr(model.get_output_embeddings(), "weight", None),))
    per_token = total if tied else total - emb.numel() * emb.element_size()
    return total, per_token + emb.shape[1] * emb.element_size()
