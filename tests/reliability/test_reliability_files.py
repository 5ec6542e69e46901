"""Nothing damaged: an interrupted save_sharded never leaves a folder that loads as complete,
the user's checkpoint is never written to; and the checkpoint cases tests/test_load_errors.py
does not have (a tensor stored in the wrong dtype, a pre-sharded folder of another model).
Single process (tp 1): these paths are per rank. The saving process is killed with SIGKILL
from inside (a patched writer), so the kill lands at an exact step."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import xtp
from load_worker import needs_meta_planning
from reliability_worker import tiny_model
from xtp.errors import AlreadyShardedError, CheckpointError

pytestmark = needs_meta_planning

HERE = Path(__file__).parents[1] / "helpers"

# a process that saves tiny_model(0), tiny_model(1), ... sharded at tp 1 into TARGET, one
# save per STEP, and SIGKILLs itself in the last one at that step: "write" (inside the rank
# file), "commit" (metadata written, no completion marker yet) or "rename" (the old folder
# moved aside, the new one not yet in place); "none": no kill
SAVER = """
import os, signal, sys
sys.path.insert(0, {here!r})
import xtp, xtp.loading.save as ps, xtp.formats.safetensors_io as io
from reliability_worker import tiny_model
target, steps = sys.argv[1], sys.argv[2].split(",")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
for seed, step in enumerate(steps):
    if step == "write":
        real_write, n = io.StreamWriter.write, [0]
        def write(self, name, t):
            n[0] += 1
            if n[0] == 3:
                die()
            real_write(self, name, t)
        io.StreamWriter.write = write
    if step == "commit":
        ps.commit = lambda tmp, final: die()
    if step == "rename":
        real_replace, calls = os.replace, [0]
        def replace(a, b):
            calls[0] += 1
            if calls[0] == 2:
                die()
            real_replace(a, b)
        ps.os.replace = replace
    xtp.save_sharded(xtp.shard(tiny_model(seed)), target)
"""


def _save(target: Path, *steps: str) -> int:
    code = SAVER.format(here=str(HERE))
    proc = subprocess.run([sys.executable, "-c", code, str(target), ",".join(steps)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "XTP_ACCELERATOR": "cpu"})
    assert proc.returncode in (0, -9), proc.stderr
    return proc.returncode


@pytest.mark.parametrize("step", ["write", "commit"])
def test_interrupted_save_into_a_new_folder_is_incomplete(tmp_path, step):
    target = tmp_path / "sharded"
    assert _save(target, step) == -9
    with pytest.raises(CheckpointError, match="incomplete.*interrupted"):
        xtp.from_pretrained(target)
    xtp.save_sharded(xtp.shard(tiny_model()), target)  # saving again cleans up, completes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]
    xtp.from_pretrained(target)


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("step,outcome", [("write", "old"), ("rename", "incomplete")])
def test_interrupted_overwrite_keeps_the_old_folder_or_says_incomplete(tmp_path, step, outcome):
    target = tmp_path / "sharded"
    assert _save(target, "none", step) == -9  # seed 0 saved, seed 1's save killed
    if outcome == "old":  # the new save never replaced anything: the old one, complete
        got = _weights(xtp.from_pretrained(target))
        old = _weights(xtp.shard(tiny_model(0)))
        assert all(torch.equal(got[k], old[k]) for k in old)
    else:
        with pytest.raises(CheckpointError, match="incomplete.*interrupted"):
            xtp.from_pretrained(target)


def _fingerprint(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_source_checkpoints_are_never_written(tmp_path):
    src = tmp_path / "src"
    tiny_model().save_pretrained(src)
    before = _fingerprint(src)
    model = xtp.from_pretrained(src)
    pre = xtp.save_sharded(model, tmp_path / "pre")
    pre_before = _fingerprint(pre)
    xtp.from_pretrained(pre)
    xtp.gather(pre, tmp_path / "full")
    assert _fingerprint(src) == before
    assert _fingerprint(pre) == pre_before


def test_tensor_stored_in_a_wrong_dtype(tmp_path):
    src = tmp_path / "src"
    tiny_model().save_pretrained(src)
    path = src / "model.safetensors"
    sd = load_file(str(path))
    key = "model.layers.0.mlp.up_proj.weight"
    sd[key] = sd[key].to(torch.int32)
    save_file(sd, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"up_proj\.weight.*stored as int32.*float32"):
        xtp.from_pretrained(src)


def test_presharded_folder_of_another_model(tmp_path):
    src = tmp_path / "src"
    tiny_model().save_pretrained(src)
    pre = xtp.preshard(src, tmp_path / "pre", 1)
    config = json.loads((pre / "config.json").read_text())
    config.update(hidden_size=96, intermediate_size=192)  # another model of the same family
    (pre / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="another model"):
        xtp.from_pretrained(pre)


def test_model_sharded_on_another_group_is_refused():
    import dataclasses

    model = tiny_model()
    ctx = xtp.init_distributed()
    xtp.shard(model, context=ctx)
    other = dataclasses.replace(ctx, tp_group=object(), _comm=[])
    with pytest.raises(AlreadyShardedError, match="already sharded on another process group"):
        xtp.shard(model, context=other)
