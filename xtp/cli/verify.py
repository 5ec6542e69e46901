"""``xtp verify MODEL --tp N``: the sharded model against the unsharded one, on random inputs.

Every rank builds (or loads) the model and shards it; TP rank 0 also keeps an unsharded
reference. A few batches of random token ids go through both; rank 0 reports the largest
absolute difference of the outputs (logits), the relative error ``||sharded - ref|| / ||ref||``
over all batches, and whether greedy generation gives the same tokens. Exit code 1 when the
relative error is above the tolerance or the tokens differ (except at a *near tie*: where the
reference's own top two logits are closer than the measured error, either token is a correct
greedy choice).

Tolerances (``--tolerance`` overrides): float32 ``1e-5`` (the parity bar of the test suite).
Half types: the sharded model rounds each rank's partial sum of a row-parallel layer to the
half type before the all-reduce, and the reduced sum once more, so it differs from the
unsharded half model by about as much as the half model differs from float32 (both errors
grow with depth). The tolerance is the larger of twice that measured error of the half type
itself (unsharded half vs unsharded float32, same inputs) and 8 units of roundoff (bfloat16
``8 * 2**-8 = 0.031``, float16 ``8 * 2**-11 = 0.0039``). A wrong slice gives errors of order 1.
"""

from __future__ import annotations

import argparse
import copy
import os

from ..models.builtin import DEFAULT_MODEL
from .options import add_pack_option, apply_pack_option

TOLERANCE = {"float32": 1e-5, "bfloat16": 8 * 2.0**-8, "float16": 8 * 2.0**-11}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "verify", help="compare the sharded model with the unsharded one on random inputs",
        description=__doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2],
        epilog="examples:\n  xtp verify tiny-llama --tp 2\n"
        "  xtp verify llama-1b --tp 2 --dtype bfloat16\n"
        "  xtp verify ./my-checkpoint --tp 4 --batches 2 --seq-len 64\n"
        "  torchrun --nproc-per-node 2 -m xtp.cli.main verify tiny-llama --tp 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="built-in name, config JSON (seeded random weights) or checkpoint "
                   f"folder (default {DEFAULT_MODEL})")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    p.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    p.add_argument("--batches", type=int, default=3, help="random batches (default 3)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per batch (default 2)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--new-tokens", type=int, default=8,
                   help="greedy tokens generated from the first batch (default 8; 0: skip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest accepted relative error (default: float32 1e-05; half "
                   "types: max(8 units of roundoff, 2 x the half type's own error))")
    add_pack_option(p)
    p.set_defaults(func=run)


def _reference(model_name: str, dtype, device):
    """The unsharded model of a checkpoint folder, loaded by transformers."""
    from ..models.build import model_class_for
    from ..models.builtin import resolve_config

    cls = model_class_for(resolve_config(model_name))
    return cls.from_pretrained(model_name, dtype=dtype, local_files_only=True).to(device).eval()


def _outputs(model, ids):
    """The model's main output for ``ids``: logits, else the last hidden state (float32)."""
    kwargs = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) \
        else {}
    out = model(input_ids=ids, **kwargs)
    main = getattr(out, "logits", None)
    return (main if main is not None else out.last_hidden_state).float()


def _first_divergence(got, want) -> tuple[int, int] | None:
    """(row, position) of the first differing token, or None when equal."""
    import torch

    for row in range(want.shape[0]):
        diff = (got[row] != want[row]).nonzero()
        if len(diff):
            return row, int(diff[0])
    return None if torch.equal(got, want) else (0, 0)


class _ErrorSum:
    """Running max abs error and relative error ``||got - want|| / ||want||``."""

    def __init__(self) -> None:
        self.max_abs, self.diff_sq, self.ref_sq = 0.0, 0.0, 0.0

    def add(self, got, want) -> dict:
        d = got - want
        b_abs, b_dsq, b_rsq = float(d.abs().max()), float(d.square().sum()), \
            float(want.square().sum())
        self.max_abs = max(self.max_abs, b_abs)
        self.diff_sq, self.ref_sq = self.diff_sq + b_dsq, self.ref_sq + b_rsq
        return {"max_abs": b_abs, "rel": (b_dsq / b_rsq) ** 0.5 if b_rsq else 0.0}

    @property
    def rel(self) -> float:
        return (self.diff_sq / self.ref_sq) ** 0.5 if self.ref_sq else 0.0


def _models(model_name: str, dtype, ctx, lead: bool):
    """(sharded model, unsharded reference or None, float32 reference or None).

    The float32 reference (rank 0, half dtypes only) measures the error the half type itself
    makes. Built-in models are built in float32 and cast, so all three hold the same weights.
    """
    import torch

    import xtp

    from ..models.builtin import build_random, resolve_config

    half = dtype != torch.float32
    if os.path.isdir(model_name):
        sharded = xtp.from_pretrained(model_name, tp_size=ctx.tp_size, dtype=dtype, context=ctx,
                                      progress=False)
        ref = _reference(model_name, dtype, ctx.device) if lead else None
        ref32 = _reference(model_name, torch.float32, ctx.device) if lead and half else None
        return sharded, ref, ref32
    full = build_random(resolve_config(model_name), torch.float32)
    ref32 = copy.deepcopy(full).to(ctx.device) if lead and half else None
    sharded = full.to(dtype)
    ref = copy.deepcopy(sharded).to(ctx.device) if lead else None
    xtp.shard(sharded, context=ctx)
    return sharded.to(ctx.device), ref, ref32


def rank_main(model_name: str, tp: int, dtype_name: str, batches: int, batch_size: int,
              seq_len: int, new_tokens: int, seed: int) -> dict:
    """One rank's work; TP rank 0 returns the measurements, the others an empty dict."""
    import torch

    import xtp

    from ..models.builtin import resolve_config

    ctx = xtp.init_distributed(tp)
    lead = ctx.tp_rank == 0
    sharded, ref, ref32 = _models(model_name, getattr(torch, dtype_name), ctx, lead)
    packed = xtp.pack_for_inference(sharded)  # what xtp run and bench use (--no-pack: 0)
    vocab = resolve_config(model_name).get_text_config().vocab_size
    gen = torch.Generator().manual_seed(seed)
    result: dict = {"device": str(ctx.device), "batches": [], "packed": packed}
    err, own = _ErrorSum(), _ErrorSum()
    with torch.no_grad():
        prompts = []
        for _ in range(batches):
            ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen).to(ctx.device)
            prompts.append(ids)
            got = _outputs(sharded, ids)
            if lead:
                want = _outputs(ref, ids)
                result["batches"].append(err.add(got, want))
                if ref32 is not None:
                    own.add(want, _outputs(ref32, ids))
        result.update(max_abs=err.max_abs, rel=err.rel)
        if ref32 is not None:
            result["half_rel"] = own.rel
        if new_tokens and prompts and getattr(sharded, "can_generate", lambda: False)():
            kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=0)
            got = sharded.generate(prompts[0], **kw)
            if lead:
                want = ref.generate(prompts[0], **kw)
                result["tokens_shape"] = list(want[:, seq_len:].shape)
                result["divergence"] = where = _first_divergence(got, want)
                if where is not None:
                    row, pos = where
                    logits = _outputs(ref, want[row:row + 1, :pos])[0, -1]
                    result["tie_margin"] = float(logits[want[row, pos]] - logits[got[row, pos]])
    return result if lead else {}


def tolerance(dtype_name: str, half_rel: float | None, override: float | None) -> float:
    """``override``, else 1e-5 for float32, else the larger of 8 units of roundoff and twice
    the error the half type itself makes (unsharded half vs unsharded float32)."""
    if override is not None:
        return override
    return max(TOLERANCE[dtype_name], 2 * (half_rel or 0.0))


def _report(r: dict, args) -> int:
    tol = tolerance(args.dtype, r.get("half_rel"), args.tolerance)
    print(f"model {args.model}  tp {args.tp}  dtype {args.dtype}  device {r['device']}"
          + (f"  ({r['packed']} linear weights per rank packed for inference)"
             if r.get("packed") else ""))
    for i, b in enumerate(r["batches"]):
        print(f"batch {i + 1}/{args.batches} ({args.batch_size} x {args.seq_len} tokens): "
              f"max abs error {b['max_abs']:.3g}, relative error {b['rel']:.3g}")
    print(f"max abs error: {r['max_abs']:.3g}")
    if r.get("half_rel") is not None:
        print(f"for scale: the unsharded {args.dtype} model against float32: relative error "
              f"{r['half_rel']:.3g}")
    ok_err = r["rel"] <= tol
    print(f"relative error: {r['rel']:.3g} (tolerance {tol:.3g}) "
          + ("ok" if ok_err else "TOO LARGE"))
    ok_tok = True
    if "divergence" not in r:
        print("greedy tokens: not compared (--new-tokens 0 or a model without generate())")
    elif r["divergence"] is None:
        rows, n = r["tokens_shape"]
        print(f"greedy tokens match: yes ({rows} x {n} tokens)")
    else:
        row, pos = r["divergence"]
        step = pos - args.seq_len
        margin = r["tie_margin"]
        near_tie = abs(margin) <= r["max_abs"]
        ok_tok = near_tie
        print(f"greedy tokens match: {'near tie' if near_tie else 'NO'} (sequence {row}, "
              f"first difference at new token {step}; the unsharded model's logit margin "
              f"there is {margin:.3g}, measured max abs error {r['max_abs']:.3g})")
    ok = ok_err and ok_tok
    print("verdict: " + ("OK, the sharded model matches the unsharded one" if ok
                         else "MISMATCH"))
    return 0 if ok else 1


def run(args) -> int:
    from ..errors import XtpError
    from ..models.builtin import resolve_config
    from .launch import run_on_ranks

    for name in ("tp", "batches", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise XtpError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.new_tokens < 0:
        raise XtpError(f"--new-tokens must be >= 0, got {args.new_tokens}")
    resolve_config(args.model)  # a wrong MODEL fails here, once, not on every rank
    params = (args.model, args.tp, args.dtype, args.batches, args.batch_size, args.seq_len,
              args.new_tokens, args.seed)
    apply_pack_option(args)
    results = run_on_ranks(rank_main, params, args.tp, "xtp-verify")
    if results is None:
        return 0
    return _report(next(r for r in results if r), args)
