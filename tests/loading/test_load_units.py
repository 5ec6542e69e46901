"""Pieces of the loader, single process: slice reads, the streaming writer, plan JSON,
rebuilt buffers (rope scaling, the construction fallback), key mapping, dtype rules, progress."""

from __future__ import annotations

import io
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

import xtp
from load_worker import build_case, needs_meta_planning, save_case, tensors
from parity_cases import CASES
from xtp.formats.safetensors_io import StreamWriter, read_header, read_tensor
from xtp.loading.progress import Progress
from xtp.models.build import meta_model
from xtp.planning.derive import derive_plan
from xtp.planning.layouts import take_ranges
from xtp.planning.serialize import fingerprint, plan_from_json, plan_to_json


@pytest.mark.parametrize("shape,dim,ranges", [
    ((7, 5), 0, ((1, 3), (5, 7))), ((7, 5), 1, ((0, 2), (3, 5))), ((3, 4, 6), 2, ((1, 2), (4, 6))),
    ((3, 4, 6), 1, ((0, 4),)), ((3, 4, 6), 0, ((2, 3),)), ((10,), 0, ((3, 7),)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_read_tensor_slices_match_take_ranges(tmp_path, shape, dim, ranges, dtype):
    t = (torch.arange(torch.Size(shape).numel()) * 3 - 7).reshape(shape).to(dtype)
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(3), "t": t}, str(path))
    infos, _ = read_header(path)
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        got = read_tensor(fd, infos["t"], dim, ranges)
        assert torch.equal(got, take_ranges(t, dim, ranges)) and got.dtype == dtype
        assert torch.equal(read_tensor(fd, infos["t"]), t)
    finally:
        os.close(fd)


def test_stream_writer_writes_standard_safetensors(tmp_path):
    items = {"x": torch.randn(3, 4), "y": torch.arange(5), "z": torch.randn(2).bfloat16(),
             "empty": torch.zeros(0, 3)}
    path = tmp_path / "s.safetensors"
    w = StreamWriter(path, [(k, v.dtype, v.shape) for k, v in items.items()], {"k": "v"})
    with pytest.raises(ValueError, match="expected x"):
        w.write("y", items["y"])
    for k, v in items.items():
        w.write(k, v)
    w.close()
    got = load_file(str(path))
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in items.items())
    assert read_header(path)[1] == {"k": "v"}


@needs_meta_planning
@pytest.mark.parametrize("case_id,tp", [("llama_kv1", 3), ("qwen2_moe", 2), ("t5", 2),
                                        ("bloom", 3), ("phi3", 2)])
def test_plan_json_round_trip(case_id, tp):
    case = next(c for c in CASES if c.id == case_id)
    plan = derive_plan(meta_model(case.config()), tp)
    data = json.loads(json.dumps(plan_to_json(plan)))
    again = plan_from_json(data)
    assert again == plan
    assert fingerprint(again) == fingerprint(plan)
    assert str(again) == str(plan)


_D = dict(hidden_size=96, intermediate_size=120, num_hidden_layers=2, vocab_size=101,
          num_attention_heads=12, num_key_value_heads=6, max_position_embeddings=64)


def _rope_configs():
    half = 96 // 12 // 2
    return {
        "llama3": transformers.LlamaConfig(**_D, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "phi3_longrope": transformers.Phi3Config(
            **_D, pad_token_id=0, original_max_position_embeddings=16, rope_parameters={
                "rope_type": "longrope", "rope_theta": 10000.0,
                "short_factor": [1.0 + i / 10 for i in range(half)],
                "long_factor": [2.0 + i / 10 for i in range(half)]}),
    }


@needs_meta_planning
@pytest.mark.parametrize("name", ["llama3", "phi3_longrope"])
def test_rotary_buffers_with_rope_scaling_are_rebuilt(tmp_path, name):
    from xtp.loading.buffers import constructed_buffers

    config = _rope_configs()[name]
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    got = xtp.from_pretrained(tmp_path)
    assert xtp.load_report(got).rebuilt_buffers == []  # transformers' own init path
    built = constructed_buffers(ref.config, type(ref), torch.float32)
    default = transformers.AutoModelForCausalLM.from_config(type(config)(**_D, pad_token_id=0))
    for k, b in ref.named_buffers():
        assert torch.equal(dict(got.named_buffers())[k], b), k
        assert torch.equal(built[k], b), k
    assert not torch.equal(ref.model.rotary_emb.inv_freq, default.model.rotary_emb.inv_freq)
    long_ids = torch.arange(30).unsqueeze(0) % 101  # past original_max_position_embeddings
    with torch.no_grad():
        assert torch.equal(got(long_ids).logits, ref(long_ids).logits)


class _Toy(nn.Module):
    """Not a transformers model: its buffer comes only from ``__init__``."""

    def __init__(self, config):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("freq", torch.arange(config.n).float() / 3, persistent=False)
        self.register_buffer("flag", torch.ones(2, dtype=torch.bool), persistent=False)


def test_buffers_of_other_models_come_from_construction():
    from types import SimpleNamespace

    from xtp.loading.buffers import rebuild_non_persistent

    config = SimpleNamespace(n=5)
    with torch.device("meta"):
        model = _Toy(config)
    rebuilt = rebuild_non_persistent(model, torch.device("cpu"), config, _Toy)
    assert sorted(rebuilt) == ["flag", "freq"]
    assert torch.equal(model.freq, torch.arange(5).float() / 3)
    assert model.flag.all() and model.lin.weight.is_meta


@needs_meta_planning
def test_bare_model_checkpoint_into_causal_lm_with_tied_head(tmp_path):
    config = transformers.LlamaConfig(**_D, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaModel(config).save_pretrained(str(tmp_path))
    assert not any(k.startswith("model.") for k in load_file(str(tmp_path / "model.safetensors")))
    ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path))
    got = xtp.from_pretrained(tmp_path, model_class=transformers.LlamaForCausalLM)
    assert got.lm_head.weight is got.model.embed_tokens.weight
    a, b = tensors(got), tensors(ref)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@needs_meta_planning
def test_keep_in_fp32_modules_follow_transformers(tmp_path):
    save_case("t5", tmp_path)
    ref = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path), dtype=torch.float16)
    got = xtp.from_pretrained(tmp_path, dtype=torch.float16)
    a, b = tensors(got), tensors(ref)
    assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}
    assert any(v.dtype == torch.float32 for v in a.values())  # T5's "wo" stays fp32
    saved = xtp.save_sharded(got, tmp_path / "saved")
    offline = xtp.preshard(tmp_path, tmp_path / "offline", 1, dtype=torch.float16)
    for folder in (saved, offline):
        again = tensors(xtp.from_pretrained(folder))
        assert {k: v.dtype for k, v in again.items()} == {k: v.dtype for k, v in b.items()}


@needs_meta_planning
def test_default_dtype_is_the_checkpoints(tmp_path):
    save_case("llama", tmp_path, dtype=torch.bfloat16)
    got = xtp.from_pretrained(tmp_path)
    assert {p.dtype for p in got.parameters()} == {torch.bfloat16}
    model = build_case("llama", torch.bfloat16)
    assert all(torch.equal(tensors(got)[k], v) for k, v in model.state_dict().items())


def test_progress_line():
    out = io.StringIO()
    bar = Progress(3000, 2, stream=out, enabled=True)
    bar._last = -1.0
    bar.update(1500, "a")
    bar.close()
    text = out.getvalue()
    assert "files 1/2" in text and "2.9 KiB" in text and text.endswith("\n")
    assert not Progress.auto(None, True, 1, 1).enabled  # pytest's stderr is not a terminal
    assert not Progress.auto(True, False, 1, 1).enabled  # never off the main rank
