"""Rank-side code of the training suite (runs inside RankPool ranks).

Every function builds the unsharded reference model and the sharded model from the same seed
on every rank, trains both, and returns plain numbers (errors, losses) for the test to judge.
The world is ``tp x dp`` (consecutive global ranks form one TP group); each data-parallel
replica trains on its own micro-batch and the reference on their concatenation (mean loss).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from parity_cases import CASES, Case

SEQ = 8
MICRO_BATCH = 2
#: values below this RMS count as zero when forming relative errors (a key bias's gradient is
#: 0 in exact arithmetic: softmax ignores a per-query constant; fp32 leaves ~1e-12 of noise)
ZERO_RMS = 1e-6


# --- models and data -------------------------------------------------------------------------

def case_by_id(case_id: str, dropout: float | None = 0.0, **overrides) -> Case:
    """The parity case ``case_id``; every dropout probability of its config set to
    ``dropout`` (``None``: as configured); ``overrides`` replace config keywords."""
    case = next(c for c in CASES if c.id == case_id)
    kwargs = dict(case.kwargs)
    if dropout is not None:
        for key, value in case.config().to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                kwargs[key] = dropout
    kwargs.update(overrides)
    return dataclasses.replace(case, kwargs=kwargs)


def build(case: Case, seed: int = 0):
    """The model of ``case`` with seeded random weights, in train mode.

    Parameters initialised to zero (biases) get random values too: a zero bias hides a bias
    added on every rank instead of once, and its updated value would be round-off only."""
    from parity_worker import _build

    model = _build(case, seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return model.train()


def batches(config, dp: int, step: int = 0) -> list[dict]:
    """One micro-batch per dp replica for training step ``step`` (same on every rank)."""
    g = torch.Generator().manual_seed(100 + step)
    width = getattr(config, "hidden_size", None) or config.d_model
    out = []
    for _ in range(dp):
        out.append({
            "input_ids": torch.randint(0, config.vocab_size, (MICRO_BATCH, SEQ), generator=g),
            "decoder_input_ids": torch.randint(0, config.vocab_size, (MICRO_BATCH, 5),
                                               generator=g),
            "labels": torch.randint(0, config.vocab_size, (MICRO_BATCH, 5), generator=g),
            "target": torch.randn(MICRO_BATCH, SEQ, width, generator=g),
        })
    return out


def concat(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# --- losses ----------------------------------------------------------------------------------

def reference_loss(model, case: Case, b: dict) -> torch.Tensor:
    """The loss of the unsharded model, in plain torch (full logits, F.cross_entropy)."""
    if case.kind == "causal":
        logits = model(b["input_ids"]).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               b["input_ids"][:, 1:].reshape(-1))
    if case.kind == "seq2seq":
        logits = model(input_ids=b["input_ids"], decoder_input_ids=b["decoder_input_ids"]).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1))
    return F.mse_loss(model(b["input_ids"]).last_hidden_state, b["target"])


def sharded_loss(model, case: Case, b: dict, seen: list | None = None) -> torch.Tensor:
    """The same loss on the sharded model: vocabulary-parallel cross-entropy for LMs
    (:func:`xtp.training.causal_lm_loss`), a regression on ``last_hidden_state`` for encoders.

    ``seen`` collects the last dimension of every LM-head output produced during the loss."""
    from xtp.training.loss import (
        causal_lm_loss,
        lm_head_of,
        local_logits,
        vocab_parallel_cross_entropy,
    )

    head = lm_head_of(model)
    handle = None
    if head is not None and seen is not None:
        handle = head.register_forward_hook(lambda m, a, out: seen.append(out.shape[-1]))
    try:
        if case.kind == "causal":
            return causal_lm_loss(model, b["input_ids"], b["input_ids"])
        if case.kind == "seq2seq":
            with local_logits(model):
                logits = model(input_ids=b["input_ids"],
                               decoder_input_ids=b["decoder_input_ids"]).logits
            start = sum(head.tp_sizes[: head.tp_comm.rank])
            return vocab_parallel_cross_entropy(logits, b["labels"], head.tp_comm, start)
        return F.mse_loss(model(b["input_ids"]).last_hidden_state, b["target"])
    finally:
        if handle is not None:
            handle.remove()


def make_optimizer(kind: str, params, lr: float | None = None):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr or 0.5, momentum=0.9)
    if kind == "adamw":
        # eps 1e-5: Adam divides by |g| + eps, so a small gradient's fp32 round-off (tiny
        # |g|: even its sign is noise) would otherwise become an lr-sized update difference
        return torch.optim.AdamW(params, lr=lr or 1e-3, eps=1e-5, weight_decay=0.01)
    raise ValueError(kind)


# --- comparisons -----------------------------------------------------------------------------

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|``, with ``|b|`` floored at ZERO_RMS per element."""
    diff = (a.double() - b.double()).norm().item()
    floor = ZERO_RMS * max(b.numel(), 1) ** 0.5
    return diff / max(b.double().norm().item(), floor)


def reference_slice(model, name: str, full: torch.Tensor, tp_rank: int) -> torch.Tensor:
    """The piece of unsharded tensor ``full`` (parameter ``name``) that this TP rank holds,
    by the plan's own splits (``plan.spec(module).param_splits()`` and ``take_ranges``)."""
    from xtp.planning.layouts import take_ranges
    from xtp.sharding.state import sharded_plan

    plan = sharded_plan(model)
    module, _, pname = name.rpartition(".")
    spec = plan.spec(module) if plan is not None else None
    for split in spec.param_splits() if spec is not None else ():
        if split.param == pname:
            local = take_ranges(full, split.dim, split.ranges[tp_rank])
            return local.zero_() if split.zero_off_rank0 and tp_rank != 0 else local
    return full


def grad_errors(model, ref, tp_rank: int) -> dict:
    """Worst relative error over parameters of each shard's gradient vs the reference's."""
    ref_params = dict(ref.named_parameters())
    out = {"grad": 0.0, "grad_name": "", "no_grad": []}
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        if p.grad is None or want is None:
            if (p.grad is None) != (want is None):
                out["no_grad"].append(name)
            continue
        e = rel(p.grad, reference_slice(model, name, want, tp_rank))
        if e > out["grad"]:
            out.update(grad=e, grad_name=name)
    return out


def param_errors(model, ref, tp_rank: int, before: dict | None = None) -> dict:
    """Worst relative error over parameters of each shard vs the reference's slice, and
    (with ``before``: {name: (local, full) before the step}) of the update."""
    ref_params = dict(ref.named_parameters())
    out = {"param": 0.0, "param_name": "", "update": 0.0, "update_name": "", "n": 0}
    for name, p in model.named_parameters():
        want = reference_slice(model, name, ref_params[name].detach(), tp_rank)
        if want.shape != p.shape:
            raise AssertionError(f"{name}: shard {tuple(p.shape)} vs slice {tuple(want.shape)}")
        e = rel(p.detach(), want)
        if e > out["param"]:
            out.update(param=e, param_name=name)
        if before is not None:
            local0, full0 = before[name]
            u = rel(p.detach() - local0, want - reference_slice(model, name, full0, tp_rank))
            if u > out["update"]:
                out.update(update=u, update_name=name)
        out["n"] += 1
    return out


def same_params(a, b) -> dict:
    """Bitwise equality and worst relative error of two models' (local) parameters."""
    worst, bitwise = 0.0, True
    pb = dict(b.named_parameters())
    for name, p in a.named_parameters():
        bitwise &= torch.equal(p, pb[name])
        worst = max(worst, rel(p.detach(), pb[name].detach()))
    return {"bitwise": bitwise, "rel": worst}


def _dp_mean(x: torch.Tensor, ctx) -> float:
    import torch.distributed as dist

    x = x.detach().clone()
    if ctx.dp_size > 1:
        dist.all_reduce(x, group=ctx.dp_group)
        x /= ctx.dp_size
    return float(x)


# --- 1. one optimizer step ---------------------------------------------------------------------

def one_step(case_id: str, tp: int, optim: str = "sgd", ddp: bool = False) -> dict:
    """One optimizer step, sharded (world = tp x dp) vs unsharded on the concatenated batch.

    The dp replicas' gradients are averaged by :func:`xtp.training.all_reduce_dp_gradients`,
    or (``ddp``) by torch's DistributedDataParallel over ``ctx.dp_group``."""
    import xtp
    from xtp.training import all_reduce_dp_gradients
    from xtp.training.loss import lm_head_of

    case = case_by_id(case_id)
    ctx = xtp.init_distributed(tp)
    ref, model = build(case), build(case)
    parts = batches(ref.config, ctx.dp_size)
    full0 = {n: p.detach().clone() for n, p in ref.named_parameters()}

    ref_opt = make_optimizer(optim, ref.parameters())
    ref_loss = reference_loss(ref, case, concat(parts))
    ref_loss.backward()
    ref_opt.step()

    xtp.shard(model, context=ctx)
    before = {n: (p.detach().clone(), full0[n]) for n, p in model.named_parameters()}
    opt = make_optimizer(optim, model.parameters())
    seen: list[int] = []
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, process_group=ctx.dp_group,
                                          find_unused_parameters=case.kind == "encoder")
        loss = sharded_loss(wrapped, case, parts[ctx.dp_rank], seen)
        loss.backward()
    else:
        loss = sharded_loss(model, case, parts[ctx.dp_rank], seen)
        loss.backward()
        all_reduce_dp_gradients(model, ctx)
    grads = grad_errors(model, ref, ctx.tp_rank)
    opt.step()

    out = {**param_errors(model, ref, ctx.tp_rank, before), **grads, "optim": optim}
    mean_loss, want = _dp_mean(loss, ctx), float(ref_loss.detach())
    head = lm_head_of(model)
    out.update(loss=mean_loss, ref_loss=want, loss_rel=abs(mean_loss - want) / abs(want),
               head_dims=seen, local_vocab=head.weight.shape[0] if head is not None else None,
               vocab=ref.config.vocab_size, tp_rank=ctx.tp_rank, dp_rank=ctx.dp_rank)
    return out


# --- 2. loss curve -----------------------------------------------------------------------------

def loss_curve(case_id: str, tp: int, steps: int = 20, lr: float = 1e-2) -> dict:
    """``steps`` AdamW steps on a fixed batch, sharded and unsharded: both loss curves."""
    import xtp
    from xtp.training import all_reduce_dp_gradients

    case = case_by_id(case_id)
    ctx = xtp.init_distributed(tp)
    ref, model = build(case), build(case)
    xtp.shard(model, context=ctx)
    parts = batches(ref.config, ctx.dp_size)
    ref_opt = make_optimizer("adamw", ref.parameters(), lr=lr)
    opt = make_optimizer("adamw", model.parameters(), lr=lr)
    got, want = [], []
    for _ in range(steps):
        ref_opt.zero_grad()
        loss = reference_loss(ref, case, concat(parts))
        loss.backward()
        ref_opt.step()
        want.append(float(loss.detach()))
        opt.zero_grad()
        loss = sharded_loss(model, case, parts[ctx.dp_rank])
        loss.backward()
        all_reduce_dp_gradients(model, ctx)
        opt.step()
        got.append(_dp_mean(loss, ctx))
    return {"sharded": got, "unsharded": want, **param_errors(model, ref, ctx.tp_rank)}


# --- 3. dropout --------------------------------------------------------------------------------

def _gather_group(t: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    import torch.distributed as dist

    if size == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def dropout_agreement(case_id: str, tp: int, overrides: dict | None = None, seed: int = 7
                      ) -> dict:
    """Train-mode forward with dropout 0.1 after ``seed_everything``, the same input on every
    rank: max difference of the residual-stream hidden states (every layer) from TP rank 0's
    and from data-parallel replica 0's."""
    import xtp
    from xtp.training import seed_everything

    case = case_by_id(case_id, dropout=0.1, **(overrides or {}))
    ctx = xtp.init_distributed(tp)
    model = build(case)
    xtp.shard(model, context=ctx)
    ids = batches(model.config, 1)[0]["input_ids"]
    seed_everything(seed, ctx)
    h = torch.stack(model(ids, output_hidden_states=True).hidden_states).detach()
    tp_all = _gather_group(h, ctx.tp_group, ctx.tp_size)
    dp_all = _gather_group(h, ctx.dp_group, ctx.dp_size)
    return {"tp_diff": max(float((x - tp_all[0]).abs().max()) for x in tp_all),
            "dp_diff": min([float((x - dp_all[0]).abs().max()) for x in dp_all[1:]] or [0.0]),
            "tp_rank": ctx.tp_rank, "dp_rank": ctx.dp_rank}


def dropout_step_parity(case_id: str, tp: int, overrides: dict | None = None, seed: int = 7
                        ) -> dict:
    """With dropout on replicated activations only (embedding, residual), a seeded training
    step of the sharded model draws the very masks of the unsharded model seeded alike
    (sharded-region randomness has its own stream): losses and updated parameters agree."""
    import xtp
    from xtp.training import all_reduce_dp_gradients, seed_everything

    case = case_by_id(case_id, dropout=0.1, **(overrides or {}))
    ctx = xtp.init_distributed(tp)
    ref, model = build(case), build(case)
    xtp.shard(model, context=ctx)
    b = batches(ref.config, 1)[0]  # same data on every replica: only the masks differ
    ref_opt = make_optimizer("sgd", ref.parameters())
    opt = make_optimizer("sgd", model.parameters())
    seed_everything(seed, ctx)
    ref_loss = reference_loss(ref, case, b)
    ref_loss.backward()
    seed_everything(seed, ctx)
    loss = sharded_loss(model, case, b)
    loss.backward()
    # each replica's reference saw its own masks; average the references' gradients too
    for p in ref.parameters():
        if p.grad is not None and ctx.dp_size > 1:
            import torch.distributed as dist

            dist.all_reduce(p.grad, group=ctx.dp_group)
            p.grad /= ctx.dp_size
    all_reduce_dp_gradients(model, ctx)
    ref_opt.step()
    opt.step()
    own = float(loss.detach())
    losses = _gather_group(loss.detach().reshape(1), ctx.dp_group, ctx.dp_size)
    want = float(ref_loss.detach())
    return {"loss_rel": abs(own - want) / want,
            "dp_losses_differ": len({float(x) for x in losses}) == ctx.dp_size,
            **param_errors(model, ref, ctx.tp_rank)}


def dropout_with_activation_checkpointing(case_id: str, tp: int, seed: int = 7) -> dict:
    """Gradients of a seeded step with attention dropout, with and without transformers'
    gradient checkpointing: the recomputed forward must draw the same region masks."""
    import xtp
    from xtp.training import seed_everything

    case = case_by_id(case_id, dropout=0.2)
    ctx = xtp.init_distributed(tp)
    model = xtp.shard(build(case), context=ctx)
    b = batches(model.config, 1)[0]
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
        model.zero_grad()
        seed_everything(seed, ctx)
        sharded_loss(model, case, b).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.eval()
    with torch.no_grad():
        plain = float(sharded_loss(model, case, b))
    seed_everything(seed, ctx)
    model.train()
    with torch.no_grad():
        dropped = float(sharded_loss(model, case, b))
    return {"rel": max(rel(grads[1][n], g) for n, g in grads[0].items()),
            "dropout_active": plain != dropped}


# --- 4. checkpoints ----------------------------------------------------------------------------

def _train(model, case, opt, ctx, steps: range, sharded: bool) -> list[float]:
    from xtp.training import all_reduce_dp_gradients

    losses = []
    for step in steps:
        parts = batches(model.config, ctx.dp_size if ctx is not None else 1, step)
        opt.zero_grad()
        if sharded:
            loss = sharded_loss(model, case, parts[ctx.dp_rank])
            loss.backward()
            all_reduce_dp_gradients(model, ctx)
        else:
            loss = reference_loss(model, case, concat(parts))
            loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def resume(case_id: str, tp: int, folder: str, dropout: float = 0.1) -> dict:
    """Train 4 steps uninterrupted; train 2, save, resume into a fresh model and optimizer,
    train 2 more: parameters, optimizer state and losses of both runs must be identical."""
    import xtp
    from xtp.training import seed_everything
    from xtp.training.checkpoint import load_training_state, save_training_state

    case = case_by_id(case_id, dropout=dropout)
    ctx = xtp.init_distributed(tp)

    def fresh(seed=0):
        model = xtp.shard(build(case, seed), context=ctx)
        return model, make_optimizer("adamw", model.parameters())

    seed_everything(1, ctx)
    a, opt_a = fresh()
    losses_a = _train(a, case, opt_a, ctx, range(4), True)

    seed_everything(1, ctx)
    b, opt_b = fresh()
    losses_b = _train(b, case, opt_b, ctx, range(2), True)
    save_training_state(b, opt_b, folder, step=2, extra={"note": "half way"})
    seed_everything(99, ctx)  # the resumed process starts elsewhere; the checkpoint decides
    c, opt_c = fresh(seed=5)
    info = load_training_state(c, opt_c, folder)
    losses_b += _train(c, case, opt_c, ctx, range(info["step"], 4), True)
    sa, sc = opt_a.state_dict()["state"], opt_c.state_dict()["state"]
    optim_equal = all(torch.equal(sa[i][k], sc[i][k]) for i in sa for k in sa[i])
    return {**same_params(a, c), "losses_equal": losses_a == losses_b, "optim_equal": optim_equal,
            "info": info, "losses": losses_a}


def _full_errors(full: dict, ref, ref_opt) -> dict:
    """Gathered full state vs the unsharded model and its optimizer (worst relative error)."""
    from xtp.training.checkpoint import optimizer_state_by_name

    sd = ref.state_dict()
    missing = sorted(set(sd) ^ set(full["model"]))
    model_err = max(rel(full["model"][k], v) for k, v in sd.items() if k in full["model"])
    want = optimizer_state_by_name(ref, ref_opt)["state"]
    optim_err = max(rel(full["optimizer"]["state"][n][k].float(), v.float())
                    for n, s in want.items() for k, v in s.items())
    return {"missing": missing, "model_err": model_err, "optim_err": optim_err}


def reshard_phase(case_id: str, tp: int, load_from: str | None, save_to: str,
                  done: int, steps: int) -> dict:
    """Continue a run at ``tp``: load ``load_from`` (any tp; None: start), train ``steps``
    more, save to ``save_to``. Compares with the unsharded model after ``done + steps`` steps;
    TP rank 0 of replica 0 also gathers ``save_to`` and compares the full state, loads it into
    an unsharded model, and writes its full folder ``save_to + '-full'``."""
    import xtp
    from xtp.training.checkpoint import (
        gather_training_state,
        load_training_state,
        save_training_state,
    )

    case = case_by_id(case_id)
    ctx = xtp.init_distributed(tp)
    ref = build(case)
    ref_opt = make_optimizer("adamw", ref.parameters())
    _train(ref, case, ref_opt, None, range(done + steps), False)

    model = xtp.shard(build(case, seed=3 if load_from else 0), context=ctx)
    opt = make_optimizer("adamw", model.parameters())
    info = load_training_state(model, opt, load_from) if load_from else {"step": 0}
    if info["step"] != done:
        raise AssertionError(f"loaded step {info['step']}, expected {done}")
    _train(model, case, opt, ctx, range(done, done + steps), True)
    save_training_state(model, opt, save_to, step=done + steps)
    out = param_errors(model, ref, ctx.tp_rank)
    if ctx.rank == 0:
        full = gather_training_state(save_to, out=save_to + "-full")
        out.update(_full_errors(full, ref, ref_opt))
        plain = build(case, seed=4)  # an unsharded model resumes from the sharded checkpoint
        plain_opt = make_optimizer("adamw", plain.parameters())
        load_training_state(plain, plain_opt, save_to)
        out["unsharded_load"] = same_params(plain, ref)["rel"]
    return out
