"""Rank-side code of the GPU tier (tests/test_gpu_tier.py). Runs inside spawned ranks."""

from __future__ import annotations

import torch

from parity_cases import CASES
from parity_worker import _build


def nccl_init_and_all_reduce() -> dict:
    """xtp's own init path on CUDA: backend, device binding, one real all-reduce."""
    import xtp

    ctx = xtp.init_distributed()
    comm = ctx.communicator()
    t = torch.ones(4, device=ctx.device) * (ctx.rank + 1)
    torch.distributed.all_reduce(t)
    return {"backend": ctx.backend, "device": str(ctx.device), "value": float(t[0]),
            "comm": type(comm).__name__, "world": ctx.world_size}


def _logits(model, ids, kind):
    if kind == "seq2seq":
        return model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
    if kind == "encoder":
        return model(ids).last_hidden_state
    return model(ids).logits


def gpu_parity(case_id: str, dtype_name: str) -> dict:
    """Sharded (this world's tp) vs unsharded on the GPU, plus an fp32 reference.

    Returns the sharded model's error against the unsharded one in the same dtype, and both
    models' errors against the fp32 unsharded model (the bf16 tolerance is set from those).
    """
    import xtp

    case = next(c for c in CASES if c.id == case_id)
    ctx = xtp.init_distributed()
    dtype = getattr(torch, dtype_name)
    ref32 = _build(case).to(ctx.device)
    ref = _build(case).to(device=ctx.device, dtype=dtype)
    model = _build(case).to(dtype=dtype)  # sharded on the CPU copy, moved by shard()
    xtp.shard(model, context=ctx)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, ref.config.vocab_size, (2, 7), generator=g).to(ctx.device)
    with torch.no_grad():
        want32 = _logits(ref32, ids, case.kind).float()
        want = _logits(ref, ids, case.kind).float()
        got = _logits(model, ids, case.kind).float()
        devices = {str(p.device) for p in model.parameters()}
        tokens_equal = True
        if case.kind != "encoder":
            a = ref.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
            b = model.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
            tokens_equal = bool(torch.equal(a, b))

    def rel(x, y):
        return float((x - y).norm() / y.norm())

    return {"rel_vs_same_dtype": rel(got, want), "sharded_vs_fp32": rel(got, want32),
            "unsharded_vs_fp32": rel(want, want32), "tokens_equal": tokens_equal,
            "param_devices": sorted(devices), "tp": ctx.tp_size}


def gpu_compiled_parity(case_id: str) -> dict:
    """The sharded fp32 model under ``torch.compile(fullgraph=True)`` on the GPU (so its
    collectives must be the xtp custom ops) against the unsharded eager model."""
    import xtp

    case = next(c for c in CASES if c.id == case_id)
    ctx = xtp.init_distributed()
    ref = _build(case).to(ctx.device)
    model = _build(case)
    xtp.shard(model, context=ctx)
    ids = torch.randint(0, ref.config.vocab_size, (2, 7),
                        generator=torch.Generator().manual_seed(1)).to(ctx.device)
    with torch.no_grad():
        want = ref(ids).logits.float()
        got = torch.compile(model, fullgraph=True)(ids, use_cache=False).logits.float()
    return {"rel": float((got - want).norm() / want.norm()), "device": str(got.device)}
