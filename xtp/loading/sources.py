"""Where a rank's tensors come from: a full checkpoint (sliced on read) or its pre-sharded file.

A source answers, for one :class:`~xtp.loading.entries.Entry`: is it there (:meth:`has`), how many
stored bytes reading it costs (:meth:`cost`), and the tensor itself (:meth:`read`, already this
rank's slice, converted to ``dtype`` on ``device``). Validation (:meth:`check`) runs on headers
only, before any data is read, and raises :class:`~xtp.errors.CheckpointError` naming the
tensor and the file.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import CheckpointError
from ..formats.checkpoint_index import CheckpointIndex
from ..formats.convert_slices import sliced_convert
from ..formats.keymap import (
    Converted,
    KeyMap,
    build_keymap,
    choose_alias,
    converter_targets,
    raise_unexpected,
    tied_sources,
)
from ..planning.layouts import take_ranges
from .entries import Entry


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def check_dtype(key: str, file, stored: torch.dtype, entry: Entry) -> None:
    """Raise CheckpointError when ``key``'s stored dtype cannot hold ``entry`` (a float weight
    stored as integers or bools, or the reverse); other widths convert on read."""
    want = entry.meta.dtype
    if stored.is_floating_point == want.is_floating_point and (stored == torch.bool) == (
            want == torch.bool):
        return
    raise CheckpointError(
        f"tensor {key!r} in {file} is stored as {str(stored).removeprefix('torch.')}, the "
        f"model's {entry.aliases[0]} is {str(want).removeprefix('torch.')}: the file is damaged "
        "or belongs to another model; re-save the checkpoint")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class FullCheckpointSource:
    """An ordinary checkpoint (all ranks read slices of the same tensors)."""

    def __init__(self, ckpt: CheckpointIndex, model: nn.Module) -> None:
        self.ckpt, self.model = ckpt, model
        self.keymap: KeyMap = build_keymap(model, ckpt.keys())
        self.tied = tied_sources(model)
        self._conv_target: dict[str, Converted] = {
            t: g for g in self.keymap.converted.values() for t in converter_targets(g)}
        self._conv_cache: dict[str, torch.Tensor] = {}

    def _alias(self, entry: Entry) -> str | None:
        return choose_alias(entry.aliases,
                            lambda a: a in self.keymap.direct or a in self._conv_target, self.tied)

    def has(self, entry: Entry) -> bool:
        return self._alias(entry) is not None

    def files_for(self, entries: list[Entry]) -> set:
        out = set()
        for e in entries:
            alias = self._alias(e)
            if alias in self.keymap.direct:
                out.add(self.ckpt.file_of(self.keymap.direct[alias]))
            elif alias is not None:
                out |= {self.ckpt.file_of(k) for k, _ in self._conv_target[alias].sources}
        return out

    def check(self, entries: list[Entry]) -> None:
        raise_unexpected(self.keymap, lambda k: self.ckpt.file_of(k).name, self.ckpt.folder)
        for e in entries:
            alias = self._alias(e)
            if alias in self._conv_target:
                shape = self._converted_shape(alias)
                if shape != e.full_shape:
                    files = sorted({self.ckpt.file_of(k).name
                                    for k, _ in self._conv_target[alias].sources})
                    raise CheckpointError(
                        f"{alias}, built from {len(self._conv_target[alias].sources)} tensors of "
                        f"{files}, has shape {list(shape)}; the model needs "
                        f"{list(e.full_shape)}: config.json does not match the weights")
            if alias not in self.keymap.direct:
                continue
            key = self.keymap.direct[alias]
            info = self.ckpt.info(key)
            if info.shape != e.full_shape:
                raise CheckpointError(
                    f"tensor {key!r} in {self.ckpt.file_of(key)} has shape {list(info.shape)}, "
                    f"the model's {alias} needs {list(e.full_shape)}: config.json does not match "
                    "the weights (wrong vocab_size, hidden_size or head counts?)")
            check_dtype(key, self.ckpt.file_of(key), info.dtype, e)

    def cost(self, entry: Entry) -> int:
        alias = self._alias(entry)
        if entry.zero or alias is None:
            return 0
        if alias in self.keymap.direct:
            info = self.ckpt.info(self.keymap.direct[alias])
        else:
            info = self.ckpt.info(self._conv_target[alias].sources[0][0])
        return _numel(entry.local_shape) * _itemsize(info.dtype)

    def read(self, entry: Entry, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        alias = self._alias(entry)
        if alias in self.keymap.direct:
            return self.ckpt.read(self.keymap.direct[alias], entry.dim, entry.ranges, dtype, device)
        group = self._conv_target[alias]
        if entry.dim is not None and group.first_target == alias:
            by_pattern: dict[str, list[str]] = {}
            for key, pattern in group.sources:
                by_pattern.setdefault(pattern, []).append(key)
            shapes = {k: self.ckpt.info(k).shape for k, _ in group.sources}
            local = sliced_convert(group.converter, by_pattern, shapes, entry.dim, entry.ranges,
                                   lambda k, d, r: self.ckpt.read(k, d, r))
            if local is not None:
                return local.to(device=device, dtype=dtype)
        full = self._converted(alias)
        if entry.dim is not None:
            full = take_ranges(full, entry.dim, entry.ranges)
        return full.to(device=device, dtype=dtype)

    def _converted_shape(self, alias: str) -> tuple[int, ...]:
        """The full shape the converter gives ``alias`` (a dry run on meta tensors)."""
        group = self._conv_target[alias]
        conv = copy.deepcopy(group.converter)
        for key, pattern in group.sources:
            info = self.ckpt.info(key)
            t = torch.empty(info.shape, dtype=info.dtype, device="meta")
            conv.add_tensor(group.first_target, key, pattern, lambda t=t: t)
        out = conv.convert(group.first_target, model=self.model, config=self.model.config,
                           hf_quantizer=None, loading_info=None)
        v = out.get(alias)
        v = v[0] if isinstance(v, list) else v
        return tuple(v.shape) if v is not None else ()

    def _converted(self, alias: str) -> torch.Tensor:
        """Run transformers' converter for ``alias``'s group (sources read whole)."""
        if alias in self._conv_cache:
            return self._conv_cache.pop(alias)
        group = self._conv_target[alias]
        conv = copy.deepcopy(group.converter)
        for key, pattern in group.sources:
            conv.add_tensor(group.first_target, key, pattern,
                            lambda key=key: self.ckpt.read(key))
        out = conv.convert(group.first_target, model=self.model, config=self.model.config,
                           hf_quantizer=None, loading_info=None)
        out = {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}
        if alias not in out:
            raise CheckpointError(f"converting {[k for k, _ in group.sources][:3]}... gave "
                                  f"{sorted(out)}, not {alias}")
        self._conv_cache.update({k: v for k, v in out.items() if k != alias})
        return out[alias]


class RankFileSource:
    """One rank's file of a pre-sharded folder: tensors are stored already sliced."""

    def __init__(self, ckpt: CheckpointIndex, model: nn.Module) -> None:
        self.ckpt = ckpt
        self.keys = set(ckpt.keys())
        self.tied = tied_sources(model)

    def _alias(self, entry: Entry) -> str | None:
        return choose_alias(entry.aliases, lambda a: a in self.keys, self.tied)

    def has(self, entry: Entry) -> bool:
        return self._alias(entry) is not None

    def files_for(self, entries: list[Entry]) -> set:
        return set(self.ckpt.files)

    def check(self, entries: list[Entry]) -> None:
        used = set()
        for e in entries:
            alias = self._alias(e)
            if alias is None:
                continue
            used.update(a for a in e.aliases if a in self.keys)
            info = self.ckpt.info(alias)
            if info.shape != e.local_shape:
                raise CheckpointError(
                    f"tensor {alias!r} in {self.ckpt.file_of(alias)} has shape "
                    f"{list(info.shape)}, this rank needs {list(e.local_shape)}: the folder was "
                    "written for another model or plan; pre-shard it again")
            check_dtype(alias, self.ckpt.file_of(alias), info.dtype, e)
        extra = sorted(self.keys - used)
        if extra:
            raise CheckpointError(
                f"{self.ckpt.files[0]} has tensors the model does not: {extra[:5]}; the folder "
                "was written for another model; pre-shard it again")

    def cost(self, entry: Entry) -> int:
        alias = self._alias(entry)
        return self.ckpt.info(alias).nbytes if alias else 0

    def read(self, entry: Entry, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.ckpt.read(self._alias(entry), None, None, dtype, device)
