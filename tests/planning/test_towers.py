"""Encoder towers the text forward never runs (xtp/planning/towers.py): an audio encoder fed
``input_features`` is probed on an input of its own and its attention and MLP pairs are split by
the same rules as the text model's, with exact parity of the tower's output (thread ranks, one
process); the shard-time check runs the tower too; a tower whose input xtp cannot make stays
whole with a note."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

import xtp
from thread_ranks import rel_err, run_sharded
from xtp.bench.coverage_rank import _first_tensor
from xtp.errors import ShardedForwardError
from xtp.models.shrink import tiny_config
from xtp.planning.spec import Role
from xtp.planning.towers import tower_inputs
from xtp.sharding.check import check_local_forward

TOWER = "model.audio_tower"


def _audio_model():
    torch.manual_seed(0)
    config = tiny_config("qwen2_audio")
    return transformers.AutoModelForSeq2SeqLM.from_config(config).float().eval()


def test_audio_tower_pairs_are_split_from_its_own_probe():
    model = _audio_model()
    plan = xtp.plan(model, 2)
    # frames: twice the tower's (tiny) max_source_positions, as its strided convolutions need
    assert plan.tower_inputs == ((TOWER, "input_features", (1, 128, 128)),)
    layer = f"{TOWER}.layers.0"
    roles = {n: plan.spec(f"{layer}.{n}").role for n in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
              "fc1", "fc2")}
    assert roles == {"self_attn.q_proj": Role.COLUMN, "self_attn.k_proj": Role.COLUMN,
                     "self_attn.v_proj": Role.COLUMN, "self_attn.out_proj": Role.ROW,
                     "fc1": Role.COLUMN, "fc2": Role.ROW}
    # the attention module's head count becomes local (found from the tower's forward)
    assert any(u.module == f"{layer}.self_attn" and u.values == (2, 2)
               for u in plan.attr_updates)
    # the convolution front-end stays whole
    assert plan.spec(f"{TOWER}.conv1") is None or not plan.spec(f"{TOWER}.conv1").is_sharded


def test_shard_time_check_runs_the_tower():
    """A tower plan missing its local head counts is refused before sharding: the check runs
    the tower on its recorded input (the text forward alone never reaches it)."""
    model = _audio_model()
    plan = xtp.plan(model, 2)
    broken = dataclasses.replace(plan, attr_updates=tuple(
        u for u in plan.attr_updates if not u.module.startswith(TOWER + ".")))
    with pytest.raises(ShardedForwardError, match=r"model\.audio_tower\.layers\.\*\.self_attn"):
        check_local_forward(model, broken)
    check_local_forward(model, dataclasses.replace(broken, tower_inputs=()))  # text only: runs


def test_tower_kept_whole_with_a_note_when_its_input_cannot_be_made():
    model = _audio_model()
    model.model.audio_tower.config.__dict__["num_mel_bins"] = None  # no size for its input
    plan = xtp.plan(model, 2)
    assert plan.tower_inputs == ()
    assert not any(s.is_sharded for s in plan.specs if s.name.startswith(TOWER + "."))
    assert any(n.startswith(f"{TOWER} kept whole: its forward runs on no input_features")
               for n in plan.notes)


@pytest.mark.parametrize("tp", [2, 3])  # 3: 4 heads over 3 ranks (uneven)
def test_split_audio_tower_has_parity(tp):
    model = _audio_model()
    x = torch.randn((1, 128, 128), generator=torch.Generator().manual_seed(2))
    tower = model.get_submodule(TOWER)
    with torch.no_grad():
        want = _first_tensor(tower(**tower_inputs(tower, "input_features", x)))

    def run(sharded):
        assert any(s.name.startswith(TOWER + ".") for s in sharded._xtp_plan.sharded())
        t = sharded.get_submodule(TOWER)
        with torch.no_grad():
            return _first_tensor(t(**tower_inputs(t, "input_features", x)))

    for got in run_sharded(model, tp, run):
        assert rel_err(got, want) <= 1e-5


def test_text_pairs_do_not_update_head_counts_inside_a_tower():
    """A text pair whose row and columns share no parent module (an LM head fed by a
    projection head) must not rewrite head counts of a vision tower's modules: the tower is
    planned on its own, and only its own pairs change its attention modules (which views its
    heads by -1 and reads no head count: nothing inside it changes)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForMaskedLM.from_config(tiny_config("ultravbert")).eval()
    plan = xtp.plan(model, 2)
    tower = "model.vision_model"
    assert plan.tower_inputs and plan.tower_inputs[0][0] == tower
    inside = {u.module for u in plan.attr_updates if u.module.startswith(tower + ".")}
    assert inside == set()


def test_a_tower_fed_feature_frames_of_its_config_input_dim_is_split_with_parity():
    """An encoder whose forward takes ``hidden_states`` of width ``config.input_dim`` (frames of
    features already extracted) is a tower too; its pairs split with parity, except one whose
    activations go through a softmax over all its features (kept whole)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(
        tiny_config("granite_speech")).float().eval()
    enc = "model.encoder"
    dim = model.get_submodule(enc).config.input_dim
    plan = xtp.plan(model, 2)
    assert plan.tower_inputs == ((enc, "hidden_states", (1, 64, dim)),)
    assert plan.spec(f"{enc}.layers.0.ff1.up_proj").role == Role.COLUMN
    assert plan.spec(f"{enc}.layers.0.ff1.down_proj").role == Role.ROW
    # out -> softmax(dim=-1) -> out_mid: a column split would normalise over a part
    assert plan.spec(f"{enc}.out").role == plan.spec(f"{enc}.out_mid").role == Role.REPLICATE
    x = torch.randn((1, 64, dim), generator=torch.Generator().manual_seed(2))
    tower = model.get_submodule(enc)
    with torch.no_grad():
        want = _first_tensor(tower(**tower_inputs(tower, "hidden_states", x)))

    def run(sharded):
        t = sharded.get_submodule(enc)
        with torch.no_grad():
            return _first_tensor(t(**tower_inputs(t, "hidden_states", x)))

    for got in run_sharded(model, 2, run):
        assert rel_err(got, want) <= 1e-5
