"""Damaged or mismatched checkpoints raise CheckpointError naming the tensor and the file,
before any tensor data is read. Single process (tp 1): these checks run per rank, identically."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import xtp
from load_worker import needs_meta_planning, save_case
from xtp.errors import CheckpointError
from xtp.formats.checkpoint_index import CheckpointIndex

pytestmark = needs_meta_planning

CASE = "llama"


@pytest.fixture()
def ckpt(tmp_path):
    return save_case(CASE, tmp_path / "ckpt")


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


@pytest.fixture()
def no_reads(monkeypatch):
    """Fails the test if any tensor data is read."""
    def read(*args, **kwargs):
        raise AssertionError("tensor data was read before the checkpoint was validated")

    monkeypatch.setattr(CheckpointIndex, "read", read)


def test_missing_tensor(ckpt, no_reads):
    _rewrite(ckpt, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        xtp.from_pretrained(ckpt)


def test_unexpected_tensor(ckpt, no_reads):
    _rewrite(ckpt, lambda sd: sd.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"layers\.0\.extra\.weight.*model\.safetensors"):
        xtp.from_pretrained(ckpt)


def test_wrong_shape(ckpt, no_reads):
    def edit(sd):
        sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(96, 95)

    _rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match=r"o_proj\.weight.*model\.safetensors.*\[96, 95\]"):
        xtp.from_pretrained(ckpt)


def test_truncated_safetensors_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        xtp.from_pretrained(ckpt)


def test_index_naming_a_missing_file(tmp_path):
    folder = save_case(CASE, tmp_path / "multi", max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (folder / gone).unlink()
    with pytest.raises(CheckpointError, match=gone):
        xtp.from_pretrained(folder)


def test_folder_without_weights(tmp_path, ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        xtp.from_pretrained(ckpt)


def test_presharded_folder_for_another_tp_size(ckpt, tmp_path):
    out = xtp.preshard(ckpt, tmp_path / "tp2", 2)
    with pytest.raises(CheckpointError, match=r"tp_size=2.*tp_size=1.*xtp preshard"):
        xtp.from_pretrained(out)


def test_incomplete_presharded_folder(ckpt, tmp_path):
    out = xtp.preshard(ckpt, tmp_path / "tp1", 1)
    (out / ".xtp_complete").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        xtp.from_pretrained(out)


def test_presharded_file_of_another_plan(ckpt, tmp_path):
    a = xtp.preshard(ckpt, tmp_path / "a", 1)
    b = xtp.preshard(ckpt, tmp_path / "b", 1, rules={"model.layers.*.mlp.*": "replicate"})
    (a / "rank-0-of-1.safetensors").write_bytes((b / "rank-0-of-1.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="not written with this folder's plan"):
        xtp.from_pretrained(a)


def test_presharded_refuses_to_overwrite_other_folders(ckpt, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        xtp.preshard(ckpt, other, 1)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from xtp.cli.main import main

    assert main(["preshard", str(tmp_path / "nothing"), str(tmp_path / "out"), "--tp", "2"]) == 2
    assert "has no config.json" in capsys.readouterr().err
