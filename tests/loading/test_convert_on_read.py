"""Reading a tensor in another dtype converts it a chunk at a time (no stored-dtype copy of the
whole tensor is held), with the same values as reading it and converting it with ``.to``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import xtp.formats.safetensors_io as io
from xtp.formats.checkpoint_index import CheckpointIndex


@pytest.fixture
def folder(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(37, 53, generator=g),
               "e": torch.randn(5, 7, 3, generator=g).bfloat16(),
               "s": torch.tensor(1.5), "z": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


@pytest.mark.parametrize("chunk", [2, 20, 1 << 22])  # smaller than one element, uneven, one read
def test_converted_read_equals_read_then_to(folder, monkeypatch, chunk):
    path, tensors = folder
    monkeypatch.setattr(io, "CONVERT_CHUNK", chunk)
    with CheckpointIndex.open(path) as ck:
        for key, t in tensors.items():
            for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                got = ck.read(key, dtype=dtype)
                assert got.dtype == dtype and torch.equal(got, t.to(dtype)), (key, dtype)
            for dim in range(t.dim()):
                if t.shape[dim] < 3:
                    continue
                ranges = [(0, 1), (2, t.shape[dim])]
                want = torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim)
                assert torch.equal(ck.read(key, dim, ranges, torch.float16), want.half())
        before = ck.stats.bytes_read  # bytes read are counted as stored, converted or not
        ck.read("e", dtype=torch.float32)
        assert ck.stats.bytes_read - before == tensors["e"].numel() * 2


def test_conversion_holds_one_chunk_not_the_stored_tensor(folder, monkeypatch):
    """The only stored-dtype buffer is the chunk: every uint8 staging tensor allocated while
    reading is at most CONVERT_CHUNK bytes."""
    path, tensors = folder
    monkeypatch.setattr(io, "CONVERT_CHUNK", 64)
    sizes = []
    real_empty = torch.empty

    def spy(*shape, dtype=None, **kw):
        t = real_empty(*shape, dtype=dtype, **kw)
        if dtype == torch.uint8:
            sizes.append(t.numel())
        return t

    monkeypatch.setattr(io.torch, "empty", spy)
    with CheckpointIndex.open(path) as ck:
        got = ck.read("w", dtype=torch.bfloat16)
    assert torch.equal(got, tensors["w"].bfloat16())
    assert sizes and max(sizes) <= 64, sizes
