"""Training through sharded models, on real gloo ranks (fp32, tiny random 2-layer configs).

* one optimizer step at tp 2 and 3, and at tp 2 x dp 2, equals the same step unsharded on the
  whole batch: every rank's shard vs the matching slice of the unsharded parameter (relative
  error <= 1e-5), each shard's gradient and (SGD) the update itself (<= 1e-4: sums with
  cancellation, e.g. a norm weight's gradient, carry ~1e-5 of fp32 round-off), and the loss
  (vocabulary-parallel cross-entropy vs ``F.cross_entropy``; no rank's LM head produces more
  than its own vocabulary slice);
* a 20-step loss curve matches the unsharded one;
* dropout: replicated activations agree across a TP group (also with uneven heads), differ
  across dp replicas, and a seeded step with residual dropout equals the unsharded one;
* checkpoints: save -> resume -> continue is bit-for-bit the uninterrupted run; a tp 2 run
  continues at tp 3 and back at tp 2 (through the gathered full state) on the unsharded
  model's trajectory.

Rank-side code: ``training_worker.py``.
"""

from __future__ import annotations

import pytest

from training_worker import (
    dropout_agreement,
    dropout_step_parity,
    dropout_with_activation_checkpointing,
    loss_curve,
    one_step,
    reshard_phase,
    resume,
)

#: architectures and what each one proves
ARCHS = {
    "llama": "dense decoder, separate q/k/v",
    "llama_kv1": "GQA with one KV head: KV replicated on every rank (summed gradients)",
    "phi3": "fused qkv_proj and gate_up_proj",
    "gpt2": "Conv1D weights, fused c_attn",
    "gpt_neox": "per-head interleaved fused qkv",
    "qwen3": "per-head q/k norms: replicated params with partial gradients",
    "mixtral": "MoE: fused 3-D experts, router weights scaled inside the experts",
    "bert": "encoder (regression loss on last_hidden_state)",
    "t5": "encoder-decoder, relative position bias split by heads, tied LM head",
}
PARAM_TOL, GRAD_TOL, LOSS_TOL = 1e-5, 1e-4, 1e-5

STEP_PARAMS = [pytest.param(a, tp, opt, id=f"{a}-tp{tp}-{opt}")
               for a in ARCHS for tp, opt in ((2, "sgd"), (3, "adamw"))]
STEP_PARAMS.append(pytest.param("llama_kv2_tp4", 4, "sgd", id="llama_kv2_tp4-tp4-sgd"))


def _check_step(results: list[dict], where: str) -> None:
    for r in results:
        rank = f"{where} tp rank {r['tp_rank']} dp rank {r['dp_rank']}"
        assert r["n"] > 0
        assert r["param"] <= PARAM_TOL, f"{rank}: {r['param_name']} rel {r['param']:.2e}"
        assert r["grad"] <= GRAD_TOL, f"{rank}: grad of {r['grad_name']} rel {r['grad']:.2e}"
        assert not r["no_grad"], f"{rank}: gradient only on one side: {r['no_grad']}"
        if r["optim"] == "sgd":  # an Adam first step is ~lr * sign(g): no test of g
            assert r["update"] <= GRAD_TOL, (
                f"{rank}: update of {r['update_name']} rel {r['update']:.2e}")
        assert r["loss_rel"] <= LOSS_TOL, f"{rank}: loss {r['loss']} vs {r['ref_loss']}"
        if r["local_vocab"] is not None:  # the LM head only ever gave this rank's slice
            assert r["local_vocab"] < r["vocab"]
            assert r["head_dims"] and set(r["head_dims"]) == {r["local_vocab"]}, r["head_dims"]


@pytest.mark.distributed
@pytest.mark.parametrize("case_id,tp,optim", STEP_PARAMS)
def test_one_step_matches_unsharded(rank_pool, case_id, tp, optim):
    _check_step(rank_pool(tp).run(one_step, case_id, tp, optim), f"{case_id} tp {tp}")


@pytest.mark.distributed
@pytest.mark.parametrize("case_id", list(ARCHS))
def test_one_step_tp2_dp2_matches_unsharded_on_whole_batch(rank_pool, case_id):
    results = rank_pool(4).run(one_step, case_id, 2, "sgd")
    assert sorted((r["tp_rank"], r["dp_rank"]) for r in results) == [
        (0, 0), (0, 1), (1, 0), (1, 1)]
    _check_step(results, f"{case_id} tp 2 x dp 2")


@pytest.mark.distributed
def test_one_step_tp3_dp2_matches_unsharded_on_whole_batch(rank_pool):
    """World 6: KV heads replicated inside each TP group, gradients averaged across groups."""
    results = rank_pool(6).run(one_step, "llama_kv1", 3, "adamw")
    assert sorted((r["tp_rank"], r["dp_rank"]) for r in results) == [
        (t, d) for t in range(3) for d in range(2)]
    _check_step(results, "llama_kv1 tp 3 x dp 2")


@pytest.mark.distributed
@pytest.mark.parametrize("case_id", ["llama_kv1", "qwen3", "mixtral"])
def test_one_step_tp2_dp2_with_ddp_on_dp_group(rank_pool, case_id):
    """torch DDP over ``ctx.dp_group`` composes with xtp's gradient hooks (they run before
    DDP's reducer sees a gradient): replicated KV rows, per-head norms, routing weights."""
    _check_step(rank_pool(4).run(one_step, case_id, 2, "sgd", True), f"{case_id} ddp")


@pytest.mark.distributed
def test_loss_curve_20_steps_matches_unsharded(rank_pool):
    r = rank_pool(2).run(loss_curve, "llama", 2, 20, 3e-3)[0]
    got, want = r["sharded"], r["unsharded"]
    assert len(got) == 20
    for step, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs {b}"
    assert want[-1] < want[0] / 4, "the tiny model should learn its batch"


@pytest.mark.distributed
def test_dropout_replicated_activations_agree_in_tp_group_differ_across_dp(rank_pool):
    results = rank_pool(4).run(dropout_agreement, "gpt2", 2)
    for r in results:
        assert r["tp_diff"] == 0.0, r
        assert r["dp_diff"] > 0.0, r


@pytest.mark.distributed
def test_dropout_agrees_with_uneven_heads(rank_pool):
    """6 heads over 4 ranks (2, 2, 1, 1): attention dropout consumes different amounts of
    randomness per rank; the residual dropout after the row layer must still agree."""
    for r in rank_pool(4).run(dropout_agreement, "gpt2", 4, {"n_head": 6}):
        assert r["tp_diff"] == 0.0, r


@pytest.mark.distributed
def test_dropout_step_with_residual_dropout_matches_unsharded(rank_pool):
    results = rank_pool(4).run(dropout_step_parity, "gpt2", 2, {"attn_pdrop": 0.0})
    for r in results:
        assert r["loss_rel"] <= LOSS_TOL, r
        assert r["param"] <= PARAM_TOL, r
        assert r["dp_losses_differ"], "dp replicas drew the same dropout masks"


@pytest.mark.distributed
def test_attention_dropout_survives_activation_checkpointing(rank_pool):
    """Region random streams derive from the default generator's state, which activation
    checkpointing restores before recomputing: the same masks, the same gradients (up to
    summation order; other masks would differ by O(1))."""
    for r in rank_pool(2).run(dropout_with_activation_checkpointing, "llama", 2):
        assert r["dropout_active"], "attention dropout did not change the loss"
        assert r["rel"] <= 1e-6, r


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp2xdp2"])
def test_save_resume_continue_equals_uninterrupted(rank_pool, tmp_path, world):
    """llama with attention dropout (tensor-parallel region random streams included)."""
    for r in rank_pool(world).run(resume, "llama", 2, str(tmp_path / "ckpt")):
        assert r["bitwise"], r
        assert r["optim_equal"] and r["losses_equal"], r
        assert r["info"] == {"step": 2, "extra": {"note": "half way"}}


@pytest.mark.distributed
def test_reshard_2_to_3_and_back(rank_pool, tmp_path):
    """GPT-2 (fused c_attn, tied LM head): 3 steps at tp 2 -> save -> 2 steps at tp 3 (loaded
    from the tp 2 shards) -> save -> gather -> 1 step at tp 2 (from the full folder); every
    phase on the unsharded trajectory,
    every gathered state equal to the unsharded model's and optimizer's, and loadable into an
    unsharded model."""
    a, b, c = (str(tmp_path / n) for n in "abc")
    phases = [(2, None, a, 0, 3), (3, a, b, 3, 2), (2, b + "-full", c, 5, 1)]
    for tp, src, dst, done, steps in phases:
        results = rank_pool(tp).run(reshard_phase, "gpt2", tp, src, dst, done, steps)
        for r in results:
            assert r["param"] <= PARAM_TOL, (tp, r)
        full = results[0]
        assert full["missing"] == [], full["missing"]
        assert full["model_err"] <= PARAM_TOL and full["optim_err"] <= PARAM_TOL, full
        assert full["unsharded_load"] <= PARAM_TOL, full


# --- in-process units (no ranks) -------------------------------------------------------------

def _split(*per_rank):
    from xtp.planning.spec import ParamSplit

    return ParamSplit("weight", 0, tuple(tuple(r) for r in per_rank))


@pytest.mark.parametrize("split,want", [
    # 1 KV head (rows 0..8) held by both ranks
    (_split([(0, 8)], [(0, 8)]), [(((0, 0, 8),), 8), (((0, 0, 8),), 8)]),
    # 2 KV heads over 4 ranks: pairs share one head each
    (_split([(0, 8)], [(0, 8)], [(8, 16)], [(8, 16)]),
     [(((0, 0, 8),), 16), (((0, 0, 8),), 16), (((0, 8, 8),), 16), (((0, 8, 8),), 16)]),
    # fused q|k|v with one replicated KV head: only the k and v rows are shared
    (_split([(0, 16), (32, 40), (40, 48)], [(16, 32), (32, 40), (40, 48)]),
     [(((16, 0, 8), (24, 8, 8)), 16), (((16, 0, 8), (24, 8, 8)), 16)]),
    # an ordinary split: nothing shared, no hook, no collective
    (_split([(0, 8)], [(8, 16)]), [((), 0), ((), 0)]),
], ids=["kv1", "kv2-tp4", "fused-kv1", "disjoint"])
def test_shared_rows_of_replicated_kv_heads(split, want):
    from xtp.sharding.hooks import shared_pieces

    assert [shared_pieces(split, r) for r in range(len(split.ranges))] == want


class _TwiceComm:
    """Stands in for a 2-rank group whose other rank holds the same partial gradient."""

    world_size, rank = 2, 0

    def all_reduce(self, t):
        return t.mul_(2)


def test_gradient_hooks_sum_shared_rows_and_zero_rank0_only_params():
    import torch
    from torch import nn

    from xtp.planning.spec import ModuleSpec, ParamSplit, Role, ShardPlan, WeightKind
    from xtp.sharding.hooks import register_split_grad_hooks

    spec = ModuleSpec("m", Role.EXPERTS, WeightKind.EXPERT_WEIGHTS, "unit", params=(
        ParamSplit("w", 0, (((0, 2), (4, 6)), ((2, 4), (4, 6)))),   # rows 4..6 shared
        ParamSplit("b", 0, (((0, 3),), ((0, 3),)), zero_off_rank0=True),
    ))
    plan = ShardPlan(2, None, (spec,))
    for rank in (0, 1):
        mod = nn.Module()
        mod.w, mod.b = nn.Parameter(torch.ones(4, 2)), nn.Parameter(torch.ones(3))
        undo: list = []
        register_split_grad_hooks(plan, {"m": mod}, _TwiceComm(), rank, undo)
        (3 * mod.w.sum() + 5 * mod.b.sum()).backward()
        assert mod.w.grad[:2].eq(3).all() and mod.w.grad[2:].eq(6).all()  # own rows, shared
        assert mod.b.grad.eq(5 if rank == 0 else 0).all()
        for step in undo:
            step()


def test_load_refuses_an_incomplete_training_checkpoint(tmp_path):
    from xtp.errors import CheckpointError
    from xtp.training.checkpoint import read_training_meta

    (tmp_path / "training_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="interrupted"):
        read_training_meta(tmp_path)


@pytest.mark.parametrize("content, says", [
    ("{not json", "cannot be read"),
    (b"\xff\xfe", "cannot be read"),
    ("[1, 2]", "is not a JSON object"),
])
def test_load_refuses_a_damaged_training_state_file(tmp_path, content, says):
    from xtp.errors import CheckpointError
    from xtp.training.checkpoint import read_training_meta

    (tmp_path / ".xtp_training_complete").write_text("ok\n")
    path = tmp_path / "training_state.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError, match=f"training_state.json {says}.*damaged"):
        read_training_meta(tmp_path)
