"""One rank of ``xtp coverage``: for each model type, build tiny, shard, compare, report.

Run as ``python -m xtp.bench.coverage_rank JOB.json`` with torchrun-style variables (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) set by :mod:`xtp.bench.coverage`. Every rank
builds the same seeded model, so the unsharded reference is computed on each rank. For each
type the rank appends two JSON lines to ``<out_dir>/rank<R>.jsonl``: ``{"type", "event":
"start"}`` before, and ``{"type", "event": "done", ...}`` with its outcome after, so that the
parent can tell which type a hung or crashed group was on.

Outcome fields: ``status`` is ``cannot_build`` (the tiny model does not build or run
unsharded), ``refused`` (xtp raised a typed error), ``error`` (sharding or the sharded forward
raised something else) or ``ran``; ``reason`` one line; for ``ran``: ``rel_err`` (logits,
fp32; the worst of it and ``tower_rel_err``, each encoder tower's output error when the plan
split towers the text forward does not run), ``tokens_equal`` (a few greedy tokens),
``held_bytes`` (this rank's parameter bytes) and ``full_bytes`` (the unsharded model's).
"""

from __future__ import annotations

import json
import os
import sys
import time

MAX_PARAMS = 5_000_000  # a "tiny" build above this means the shrinker missed a size
NEW_TOKENS = 4
SEED = 0


def _line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _auto(kind: str):
    import transformers

    return {"causal": transformers.AutoModelForCausalLM,
            "masked": transformers.AutoModelForMaskedLM,
            "seq2seq": transformers.AutoModelForSeq2SeqLM}[kind]


def _build(config, kind: str):
    import torch

    torch.manual_seed(SEED)
    return _auto(kind).from_config(config).float().eval()


def _no_cache(model) -> dict:
    """``use_cache=False`` where the forward takes it (no cache objects for one forward)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def _logits(model, ids, kind: str):
    if kind == "seq2seq":
        return model(input_ids=ids, decoder_input_ids=ids[:, :3], **_no_cache(model)).logits
    return model(input_ids=ids, **_no_cache(model)).logits


def _tokens(model, ids, kind: str, use_generate: bool):
    """``NEW_TOKENS`` greedy tokens: ``generate`` where the unsharded model supports it, else a
    plain argmax loop (no cache); masked LMs: the argmax of every position."""
    import torch

    if kind == "masked":
        return _logits(model, ids, kind).argmax(-1)
    if use_generate:
        return model.generate(ids[:1], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=0)
    if kind == "seq2seq":
        dec = ids[:1, :1]
        for _ in range(NEW_TOKENS):
            nxt = model(input_ids=ids[:1], decoder_input_ids=dec, **_no_cache(model)).logits
            dec = torch.cat([dec, nxt[:, -1:].argmax(-1)], dim=1)
        return dec
    out = ids[:1]
    for _ in range(NEW_TOKENS):
        nxt = model(input_ids=out, **_no_cache(model)).logits[:, -1:].argmax(-1)
        out = torch.cat([out, nxt], dim=1)
    return out


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _reference(model_type: str, kind: str, kv_heads: int | None) -> dict:
    """The tiny config, inputs and unsharded outputs; or a ``cannot_build`` outcome."""
    import torch

    from xtp.models.shrink import ShrinkError, tiny_config

    try:
        config = tiny_config(model_type, kv_heads)
    except ShrinkError as exc:
        return {"status": "cannot_build", "reason": str(exc)}
    try:
        ref = _build(config, kind)
        n = sum(p.numel() for p in ref.parameters())
        if n > MAX_PARAMS:
            big = max(ref.named_parameters(), key=lambda kv: kv[1].numel())
            return {"status": "cannot_build", "reason": f"not tiny: {n} parameters (largest "
                    f"{big[0]} {tuple(big[1].shape)}): the shrinker misses a size"}
        vocab = config.get_text_config().vocab_size
        ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = _logits(ref, ids, kind)
            if not torch.isfinite(want).all():
                return {"status": "cannot_build", "reason": "the tiny model's logits are not "
                        "finite unsharded"}
            try:
                want_tokens, use_generate = _tokens(ref, ids, kind, True), True
            except Exception:
                want_tokens, use_generate = _tokens(ref, ids, kind, False), False
    except Exception as exc:
        return {"status": "cannot_build", "reason": f"unsharded: {_line(exc)}"}
    return {"config": config, "ids": ids, "want": want, "want_tokens": want_tokens,
            "use_generate": use_generate}


def _first_tensor(out):
    """The first tensor of a model output (``last_hidden_state`` of an encoder)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    items = out.to_tuple() if hasattr(out, "to_tuple") else out
    return next(t for t in items if isinstance(t, torch.Tensor))


def _tower_errors(sharded, config, kind: str) -> dict[str, float]:
    """Relative error of each encoder tower the plan split on a probe of its own (audio and
    vision encoders the text forward never runs): its output on a seeded random input, the
    sharded model's against a fresh unsharded build's."""
    import torch

    from xtp.planning.towers import tower_inputs
    from xtp.sharding.state import sharded_plan

    towers = sharded_plan(sharded).tower_inputs
    if not towers:
        return {}
    ref = _build(config, kind)
    out = {}
    for name, key, shape in towers:
        x = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ref_tower, tower = ref.get_submodule(name), sharded.get_submodule(name)
            want = _first_tensor(ref_tower(**tower_inputs(ref_tower, key, x))).float()
            got = _first_tensor(tower(**tower_inputs(tower, key, x))).float()
        out[name] = float((got - want).norm() / want.norm())
    return out


def check(model_type: str, kind: str, tp: int) -> dict:
    """The outcome of ``model_type`` (built as ``kind``) sharded at ``tp`` on this rank."""
    import torch

    import xtp
    from xtp.errors import XtpError
    from xtp.models.shrink import KV_HEADS

    reasons = []
    for kv_heads in (KV_HEADS, None):  # 2 KV heads where the model allows, else one per head
        built = _reference(model_type, kind, kv_heads)
        if "status" not in built:
            break
        reasons.append(built["reason"])
    else:
        return {"status": "cannot_build", "reason": reasons[0]}
    config, ids, want, want_tokens, use_generate = (
        built[k] for k in ("config", "ids", "want", "want_tokens", "use_generate"))
    model = _build(config, kind)
    full = _bytes(model)
    try:
        xtp.shard(model, tp_size=tp)
    except XtpError as exc:
        return {"status": "refused", "reason": " ".join(str(exc).split())}
    except Exception as exc:
        return {"status": "error", "reason": f"xtp.shard raised {_line(exc)}"}
    try:
        with torch.no_grad():
            got = _logits(model, ids, kind)
            tokens = _tokens(model, ids, kind, use_generate)
        towers = _tower_errors(model, config, kind)
    except Exception as exc:
        return {"status": "error", "reason": f"sharded forward raised {_line(exc)}"}
    rel = float((got.float() - want.float()).norm() / want.float().norm())
    rel = max([rel, *towers.values()])  # the worst of the logits and every split tower
    same = bool(tokens.shape == want_tokens.shape and torch.equal(tokens, want_tokens))
    return {"status": "ran", "rel_err": rel, "tokens_equal": same, "held_bytes": _bytes(model),
            "full_bytes": full, "tokens_via": "generate" if use_generate else "argmax loop",
            **({"tower_rel_err": towers} if towers else {})}


def main(job_path: str) -> int:
    import torch
    import torch.distributed as dist

    job = json.loads(open(job_path).read())
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    from datetime import timedelta

    import transformers

    transformers.logging.set_verbosity_error()
    rank = int(os.environ["RANK"])
    from xtp.accelerators.devices.registry import create

    # the sweep computes on the host CPU: that accelerator names the collective backend
    backend = create("cpu").default_dist_backend()
    dist.init_process_group(backend, timeout=timedelta(seconds=float(job["timeout_s"])))
    path = os.path.join(job["out_dir"], f"rank{rank}.jsonl")
    with open(path, "a", buffering=1) as out:
        for model_type, kind in job["types"]:
            out.write(json.dumps({"type": model_type, "event": "start"}) + "\n")
            start = time.monotonic()
            try:
                result = check(model_type, kind, job["tp"])
            except Exception as exc:  # nothing above should raise; say so if it does
                result = {"status": "error", "reason": f"coverage check raised {_line(exc)}"}
            result.update(type=model_type, event="done",
                          seconds=round(time.monotonic() - start, 2))
            out.write(json.dumps(result) + "\n")
            dist.barrier()  # the next type starts together on every rank
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
