"""Property tests of the checkpoint reader against damaged files: random bytes, truncations,
bogus header lengths, byte flips and edited header JSON (wrong types, negative or crossed
offsets, unknown dtypes, odd shapes), and damaged index files. The reader either returns a
consistent header (every tensor inside the file, bytes matching shape x dtype, and readable)
or raises CheckpointError: never another exception type, never a hang.
(The planner's partition math and layouts are fuzzed in test_partition.py / test_layouts.py.)"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from xtp.errors import CheckpointError
from xtp.formats.checkpoint_index import CheckpointIndex
from xtp.formats.safetensors_io import StreamWriter, read_header, read_tensor

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TMP = Path(tempfile.mkdtemp(prefix="xtp-fuzz-"))


def _valid_file() -> bytes:
    path = TMP / "valid.safetensors"
    items = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
             "b": torch.ones(4, dtype=torch.bfloat16), "c": torch.tensor([1, 2], dtype=torch.int64)}
    w = StreamWriter(path, [(k, v.dtype, v.shape) for k, v in items.items()], {"k": "v"})
    for k, v in items.items():
        w.write(k, v)
    w.close()
    return path.read_bytes()


VALID = _valid_file()
(HEADER_LEN,) = struct.unpack("<Q", VALID[:8])
HEADER = json.loads(VALID[8:8 + HEADER_LEN])
DATA = VALID[8 + HEADER_LEN:]


def _check(raw: bytes) -> None:
    """The property: a consistent, readable header, or CheckpointError."""
    path = TMP / "fuzz.safetensors"
    path.write_bytes(raw)
    try:
        infos, meta = read_header(path)
    except CheckpointError:
        return
    assert isinstance(meta, dict)
    fd = __import__("os").open(path, __import__("os").O_RDONLY)
    try:
        for info in infos.values():
            numel = 1
            for d in info.shape:
                numel *= d
            assert info.nbytes == numel * torch.empty((), dtype=info.dtype).element_size()
            assert 8 <= info.offset and info.offset + info.nbytes <= len(raw)
            if info.nbytes <= 1 << 16:
                assert read_tensor(fd, info).shape == info.shape
    finally:
        __import__("os").close(fd)


def _with_header(header, pad: bytes = b"") -> bytes:
    raw = json.dumps(header).encode() + pad
    return struct.pack("<Q", len(raw)) + raw + DATA


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes(raw):
    _check(raw)


@SETTINGS
@given(st.integers(0, len(VALID) - 1))
def test_truncated_file_is_always_an_error(cut):
    path = TMP / "cut.safetensors"
    path.write_bytes(VALID[:cut])
    try:
        read_header(path)
    except CheckpointError:
        return
    raise AssertionError(f"a file cut to {cut} of {len(VALID)} bytes was accepted")


@SETTINGS
@given(st.integers(0, 2**64 - 1))
def test_bogus_header_length(n):
    _check(struct.pack("<Q", n) + VALID[8:])


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1,
                max_size=6))
def test_flipped_bytes(flips):
    raw = bytearray(VALID)
    for pos, value in flips:
        raw[pos] = value
    _check(bytes(raw))


@SETTINGS
@given(st.sampled_from(["a", "b", "c", "__metadata__"]),
       st.sampled_from(["dtype", "shape", "data_offsets", None]), json_values)
def test_edited_header_field(name, field, value):
    header = json.loads(json.dumps(HEADER))
    if field is None or name == "__metadata__":
        header[name] = value
    else:
        header[name][field] = value
    _check(_with_header(header))


@SETTINGS
@given(st.sampled_from(["a", "b", "c"]),
       st.tuples(st.integers(-2**40, 2**40), st.integers(-2**40, 2**40)),
       st.lists(st.integers(-3, 2**33), max_size=4),
       st.sampled_from(["F32", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q4", "", "f32"]))
def test_bogus_offsets_shapes_and_dtypes(name, offsets, shape, dtype):
    header = json.loads(json.dumps(HEADER))
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": list(offsets)}
    _check(_with_header(header))


@SETTINGS
@given(json_values)
def test_header_that_is_not_an_object(value):
    _check(_with_header(value))


@SETTINGS
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
       | json_values.map(lambda v: json.dumps({"weight_map": v}).encode()))
def test_damaged_index(raw):
    folder = TMP / "indexed"
    folder.mkdir(exist_ok=True)
    (folder / "model-00001-of-00001.safetensors").write_bytes(VALID)
    (folder / "model.safetensors.index.json").write_bytes(raw)
    try:
        with CheckpointIndex.open(folder) as ckpt:
            for key in ckpt.keys():
                ckpt.read(key)
    except CheckpointError:
        pass


def _presharded() -> Path:
    """A complete pre-sharded folder (tp 2) of a tiny Llama, made once."""
    folder = TMP / "pre"
    if not (folder / ".xtp_complete").is_file():
        import transformers

        import xtp

        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=1, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=37)
        transformers.LlamaForCausalLM(config).save_pretrained(TMP / "plain")
        xtp.preshard(TMP / "plain", folder, 2, progress=False)
    return folder


def _copy_presharded(name: str) -> Path:
    import shutil

    dst = TMP / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(_presharded(), dst)
    return dst


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["format", "format_version", "tp_size", "dtype", "plan",
                        "plan_fingerprint", "files", "model_class", None]), json_values)
@example("model_class", True)  # found by this fuzzer: a non-string class name
def test_damaged_presharded_metadata(field, value):
    """An edited xtp_metadata.json: gather (which reads every rank file with the stored plan)
    works or raises CheckpointError, and never touches the source folder."""
    import xtp

    folder = _copy_presharded("pre-edit")
    meta_path = folder / "xtp_metadata.json"
    meta = json.loads(meta_path.read_text())
    if field is None:
        meta = value
    else:
        meta[field] = value
    meta_path.write_text(json.dumps(meta))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = TMP / "pre-edit-out"
    __import__("shutil").rmtree(out, ignore_errors=True)
    try:
        xtp.gather(folder, out, progress=False)
    except CheckpointError:
        assert not out.exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@SETTINGS
@given(st.binary(max_size=120))
def test_presharded_metadata_that_is_not_json(raw):
    from xtp.formats.presharded import read_metadata

    folder = _copy_presharded("pre-bytes")
    (folder / "xtp_metadata.json").write_bytes(raw)
    try:
        read_metadata(folder)
    except CheckpointError:
        pass


def test_presharded_markers():
    """No .xtp_complete: incomplete; no xtp_metadata.json: not a pre-sharded folder at all."""
    from xtp.errors import NotPreshardedError
    from xtp.formats.presharded import read_metadata

    folder = _copy_presharded("pre-marker")
    (folder / ".xtp_complete").unlink()
    with pytest.raises(CheckpointError, match="incomplete pre-sharded folder"):
        read_metadata(folder)
    (folder / "xtp_metadata.json").unlink()
    with pytest.raises(NotPreshardedError, match="is not a pre-sharded folder"):
        read_metadata(folder)
    with pytest.raises(NotPreshardedError, match="is not a folder"):
        read_metadata(folder / "rank-0-of-2.safetensors")
