"""One view over a checkpoint folder: which tensors it has, where, and reading slices of them.

Formats, tried in this order:

1. ``model.safetensors.index.json`` (``weight_map``: tensor name -> file) + its files;
2. ``model.safetensors``;
3. ``pytorch_model.bin.index.json`` + its files, then ``pytorch_model.bin`` (PyTorch pickles,
   opened with ``torch.load(mmap=True, weights_only=True)``: a fallback, whose pages stay mapped
   while the file is open).

A read of ``ranges`` along ``dim`` returns the concatenation of those ranges (the same
convention as :func:`xtp.planning.layouts.take_ranges`). Every read is counted in
:attr:`stats`, so tests and benchmarks can check a rank never reads more than its shard.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..planning.spec import Ranges
from .safetensors_io import TensorInfo, read_header, read_tensor

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


@dataclass
class ReadStats:
    """Bytes read from a checkpoint (in the stored dtype), per tensor and in total."""

    bytes_read: int = 0
    tensors_read: int = 0
    per_key: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    files_opened: list[str] = field(default_factory=list)

    def add(self, key: str, nbytes: int) -> None:
        self.bytes_read += nbytes
        self.tensors_read += 1
        self.per_key[key] += nbytes


class CheckpointIndex:
    """The tensors of one checkpoint folder. Use as a context manager (closes open files).

    ``keys()``, ``info(key)`` (dtype, shape), ``file_of(key)`` come from headers / the index only;
    ``read(key, dim, ranges)`` reads data. ``on_read(nbytes, file)`` is called after each read
    (progress bars).
    """

    def __init__(self, folder: str | os.PathLike, files: list[Path], kind: str,
                 key_file: dict[str, Path]) -> None:
        self.folder = Path(folder)
        self.files = files
        self.kind = kind
        self.key_file = key_file
        self.stats = ReadStats()
        self.on_read = None
        self._infos: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        self._headers_read: set[Path] = set()

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike) -> CheckpointIndex:
        """Find the checkpoint in ``folder``. Raises CheckpointError when there is none, or when
        an index names a file that is not there."""
        folder = Path(folder)
        for index_name, single, kind in ((SAFE_INDEX, SAFE_SINGLE, "safetensors"),
                                          (BIN_INDEX, BIN_SINGLE, "bin")):
            index = folder / index_name
            if index.is_file():
                return cls._from_index(folder, index, kind)
            if (folder / single).is_file():
                path = folder / single
                return cls(folder, [path], kind, {})
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise CheckpointError(
            f"no checkpoint in {folder}: expected {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX} or "
            f"{BIN_SINGLE}; the folder has {present[:12] or 'nothing'}. Save one with "
            "model.save_pretrained(folder)")

    @classmethod
    def _from_index(cls, folder: Path, index: Path, kind: str) -> CheckpointIndex:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
            raise CheckpointError(f"{index} is not a valid index ({exc!r}); re-save it") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: its weight_map is not a map of tensor names to file "
                                  "names; re-save the checkpoint")
        key_file = {k: folder / v for k, v in weight_map.items()}
        files = sorted(set(key_file.values()))
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise CheckpointError(
                f"{index} names file(s) {missing} that are not in {folder}; the download is "
                "incomplete: fetch the missing files or re-save the checkpoint")
        return cls(folder, files, kind, key_file)

    def __enter__(self) -> CheckpointIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bins.clear()

    # -- headers ---------------------------------------------------------------------------
    def _load_headers(self, path: Path) -> None:
        if path in self._headers_read:
            return
        self._headers_read.add(path)
        if self.kind == "safetensors":
            infos, _ = read_header(path)
            for name, info in infos.items():
                self._add_info(name, path, info)
        else:
            for name, t in self._bin(path).items():
                self._add_info(name, path, TensorInfo(name, t.dtype, tuple(t.shape), 0,
                                                      t.numel() * t.element_size()))

    def _add_info(self, name: str, path: Path, info: TensorInfo) -> None:
        owner = self.key_file.get(name)
        if owner is not None and owner != path:
            return  # the index says another file holds it; this copy is not used
        self.key_file[name] = path
        self._infos[name] = info

    def _all_headers(self) -> None:
        for path in self.files:
            self._load_headers(path)
        listed = [k for k, p in self.key_file.items() if k not in self._infos]
        if listed:
            k = listed[0]
            raise CheckpointError(f"the index says {k!r} is in {self.key_file[k].name}, but that "
                                  "file does not hold it; re-save the checkpoint")

    def keys(self) -> list[str]:
        self._all_headers()
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        if key not in self._infos:
            self._all_headers()
        return self._infos[key]

    def file_of(self, key: str) -> Path:
        return self.key_file[key]

    def __contains__(self, key: str) -> bool:
        self._all_headers()
        return key in self._infos

    # -- reading ---------------------------------------------------------------------------
    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
            self.stats.files_opened.append(path.name)
        return self._fds[path]

    def _bin(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bins:
            try:
                try:
                    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
                    sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}; the file "
                                      "is damaged or not a PyTorch state dict") from exc
            if not isinstance(sd, dict):
                raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict")
            self._bins[path] = sd
            self.stats.files_opened.append(path.name)
        return self._bins[path]

    def read(self, key: str, dim: int | None = None, ranges: Ranges | None = None,
             dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        """Tensor ``key`` (or the concatenation of its ``ranges`` along ``dim``), converted to
        ``dtype`` on ``device``. Only the requested bytes are read (safetensors)."""
        info = self.info(key)
        path = self.key_file[key]
        if self.kind == "safetensors":  # converted while read: no stored-dtype copy is held
            t = read_tensor(self._fd(path), info, dim, ranges, dtype)
        else:
            full = self._bin(path)[key]
            if dim is None or ranges is None:
                t = full.clone()
            else:
                pieces = [full.narrow(dim, a, b - a) for a, b in ranges]
                t = torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0].clone()
        nbytes = t.numel() * torch.empty((), dtype=info.dtype).element_size()  # as stored
        self.stats.add(key, nbytes)
        if self.on_read is not None:
            self.on_read(nbytes, path)
        if (dtype is not None and dtype != t.dtype) or (device is not None and device != t.device):
            t = t.to(device=device, dtype=dtype)
        return t
