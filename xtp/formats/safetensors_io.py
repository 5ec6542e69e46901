"""Reading slices of safetensors files with ``pread``, and writing them tensor by tensor.

Why not ``safetensors.safe_open(...).get_slice``: it memory-maps the whole file, and every page a
slice touches stays in the process's resident set while the file is open. A row-parallel weight
is split along its *last* dimension, so each rank's slice touches every page of the tensor. Here
a slice is read with one ``pread`` per contiguous run of bytes straight into the destination
tensor, so a rank's memory holds its slice and nothing else.

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header length
``N``, ``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}``, then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..planning.spec import Ranges

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a file: absolute byte offset of its data, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} has a damaged header: {what}; re-download or re-save it")


def _int_list(value) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)  # no bools, floats


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse ``path``'s header; check every tensor lies inside the file.

    Raises:
        CheckpointError: not a safetensors file, a damaged header (not JSON, wrong types,
            negative or inconsistent offsets and shapes, unknown dtype), or truncated (a
            tensor's bytes past the end). Never another exception type (fuzz-tested).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is not a safetensors file ({size} bytes); re-save it")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {n} bytes, the "
                f"file has {size}; re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
            raise CheckpointError(f"{path} has a damaged header ({exc}); re-save it") from None
    if not isinstance(header, dict):
        raise _damaged(path, f"it is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _damaged(path, "__metadata__ is not a map of strings to strings")
    base = 8 + n
    infos = {}
    for name, h in header.items():
        if not isinstance(h, dict):
            raise _damaged(path, f"the entry of tensor {name!r} is not an object")
        code = h.get("dtype")
        dtype = DTYPES.get(code) if isinstance(code, str) else None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {code}")
        offsets, shape = h.get("data_offsets"), h.get("shape")
        if not (_int_list(offsets) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1]):
            raise _damaged(path, f"tensor {name!r} has data_offsets {offsets!r}")
        if not (_int_list(shape) and all(d >= 0 for d in shape)):
            raise _damaged(path, f"tensor {name!r} has shape {shape!r}")
        begin, end = offsets
        shape = tuple(shape)
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != numel * itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape "
                                  f"{list(shape)} of {h['dtype']}; the file is damaged, re-save it")
        if base + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} needs bytes up to {base + end}, the file "
                f"has {size}; re-download or re-save it")
        infos[name] = TensorInfo(name, dtype, shape, base + begin, end - begin)
    return infos, meta


def slice_runs(shape: Sequence[int], itemsize: int, dim: int, ranges: Ranges):
    """Contiguous byte runs ``(file_offset, length)`` of ``ranges`` along ``dim``, in the order
    they appear in the sliced tensor (row-major), adjacent runs merged."""
    outer = 1
    for d in shape[:dim]:
        outer *= d
    inner = itemsize
    for d in shape[dim + 1:]:
        inner *= d
    extent = shape[dim]
    runs: list[list[int]] = []
    for o in range(outer):
        for a, b in ranges:
            start, length = (o * extent + a) * inner, (b - a) * inner
            if length == 0:
                continue
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1][1] += length
            else:
                runs.append([start, length])
    return runs


#: bytes read at a time when converting on read: the most a conversion holds besides its result
CONVERT_CHUNK = 4 << 20


def _pread_exact(fd: int, view: memoryview, offset: int, name: str) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise CheckpointError(f"short read of tensor {name!r} (file truncated?)")
        got += n


def read_tensor(fd: int, info: TensorInfo, dim: int | None = None,
                ranges: Ranges | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Read ``info`` (or its ``ranges`` along ``dim``) from open file ``fd`` into a new CPU tensor
    of the stored dtype, or of ``dtype``: then converted :data:`CONVERT_CHUNK` bytes at a time,
    so no stored-dtype copy of the whole tensor is ever held. Shape: ``info.shape`` with
    ``shape[dim] = sum(b - a)``."""
    shape = list(info.shape)
    itemsize = torch.empty((), dtype=info.dtype).element_size()
    if dim is None or ranges is None:
        runs = [[0, info.nbytes]] if info.nbytes else []
    else:
        runs = slice_runs(info.shape, itemsize, dim, ranges)
        shape[dim] = sum(b - a for a, b in ranges)
    convert = dtype is not None and dtype != info.dtype
    out = torch.empty(shape, dtype=dtype if convert else info.dtype)
    if out.numel() == 0:
        return out
    if not convert:
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B")
        pos = 0
        for start, length in runs:
            _pread_exact(fd, buf[pos:pos + length], info.offset + start, info.name)
            pos += length
        return out
    flat = out.view(-1)
    chunk = max(itemsize, CONVERT_CHUNK // itemsize * itemsize)
    stage = torch.empty(min(chunk, sum(n for _, n in runs)), dtype=torch.uint8)
    view = memoryview(stage.numpy()).cast("B")
    pos = 0  # elements of ``out`` filled
    for start, length in runs:
        for at in range(0, length, chunk):
            n = min(chunk, length - at)
            _pread_exact(fd, view[:n], info.offset + start + at, info.name)
            flat[pos:pos + n // itemsize].copy_(stage[:n].view(info.dtype))
            pos += n // itemsize
    return out


class StreamWriter:
    """Write a safetensors file one tensor at a time (memory: one tensor).

    ``entries`` fixes the names, dtypes and shapes (and so the header) up front; :meth:`write`
    must then be called once per entry, in order. :meth:`close` checks nothing is missing.
    """

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._order: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        for name, dtype, shape in entries:
            numel = 1
            for d in shape:
                numel *= int(d)
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": [int(d) for d in shape],
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, tuple(int(d) for d in shape), nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = path
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape, nbytes = self._order[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"expected {want} {dtype} {list(shape)}, got {name} {tensor.dtype} "
                             f"{list(tensor.shape)}")
        t = tensor.detach().to("cpu").contiguous()
        if nbytes:
            self._f.write(memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B"))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            self._f.close()
            raise ValueError(f"{self.path}: {len(self._order) - self._next} tensors not written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()
