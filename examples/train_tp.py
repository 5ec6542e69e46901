"""A minimal tensor-parallel training loop with a plain torch optimizer.

    torchrun --nproc-per-node 2 examples/train_tp.py                 # tp 2
    torchrun --nproc-per-node 4 examples/train_tp.py --tp 2          # tp 2 x dp 2
    torchrun --nproc-per-node 2 examples/train_tp.py --save ckpt     # ... then resume, at any tp:
    torchrun --nproc-per-node 3 examples/train_tp.py --resume ckpt --steps 40

The model is xtp's built-in tiny Llama with seeded random weights (no download), or any local
checkpoint folder (``--model PATH``, loaded straight into shards). The data is a small
synthetic set of token patterns the model learns quickly, different on each dp replica. See
docs/training.md for what each call does and how to use DDP / FSDP2 on the dp dimension.
"""

from __future__ import annotations

import argparse
import os

import torch

import xtp
from xtp.models.builtin import build_random, resolve_config
from xtp.training import (
    all_reduce_dp_gradients,
    causal_lm_loss,
    load_training_state,
    save_training_state,
    seed_everything,
)


def batch(vocab: int, size: int, seq: int, step: int, dp_rank: int) -> torch.Tensor:
    """``(size, seq)`` token ids: arithmetic sequences mod ``vocab``, drawn from a small fixed
    set per replica (so a few steps visibly lower the loss), shuffled by ``step``."""
    g = torch.Generator().manual_seed(dp_rank)
    start = torch.randint(0, vocab, (2 * size, 1), generator=g)
    stride = torch.randint(1, 4, (2 * size, 1), generator=g)
    pool = (start + stride * torch.arange(seq)) % vocab
    pick = torch.randperm(2 * size, generator=torch.Generator().manual_seed(step))[:size]
    return pool[pick]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llama", help="built-in name or checkpoint folder")
    ap.add_argument("--tp", type=int, default=None, help="TP size (default: the whole world)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=4, help="sequences per dp replica")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="write a training checkpoint here at the end")
    ap.add_argument("--resume", default=None, help="continue from this training checkpoint")
    args = ap.parse_args()

    ctx = xtp.init_distributed(args.tp)  # world = tp x dp; consecutive ranks form a TP group
    if os.path.isdir(args.model):
        model = xtp.from_pretrained(args.model, context=ctx)
    else:
        model = xtp.shard(build_random(resolve_config(args.model)), context=ctx)
    model.train()  # no xtp switch: train()/eval() and autograd decide
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    seed_everything(args.seed, ctx)  # same dropout in a TP group, other dp replicas differ
    start = 0
    if args.resume:  # any tp: re-sharded on the fly when the checkpoint's tp differs (the
        # random state is restored too when the world is the one that saved it)
        start = load_training_state(model, optimizer, args.resume)["step"] or 0

    vocab = model.config.vocab_size
    for step in range(start, start + args.steps):
        ids = batch(vocab, args.batch, args.seq, step, ctx.dp_rank).to(ctx.device)
        optimizer.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, ids, ids)  # vocab-parallel: no rank holds full logits
        loss.backward()                         # TP collectives run inside backward
        all_reduce_dp_gradients(model, ctx)     # average over dp replicas (or use DDP)
        optimizer.step()
        if ctx.rank == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)

    if args.save:
        save_training_state(model, optimizer, args.save, step=start + args.steps)
        if ctx.rank == 0:
            print(f"saved {args.save} (tp {ctx.tp_size}, dp {ctx.dp_size})")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
