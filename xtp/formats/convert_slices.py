"""Reading a slice of a tensor that transformers builds from several checkpoint tensors.

transformers 5 stores MoE experts as one 3-D parameter per projection, built on load from one
2-D tensor per expert: ``gate_up_proj = cat([stack(w1 of every expert), stack(w3 ...)], dim=1)``
(``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``), ``down_proj = stack(w2 ...)``. A rank
that owns ``ranges`` along one dimension of the result needs only the matching slices of the
sources: this module pushes the request through those two operations and reads just that.

:func:`sliced_convert` returns ``None`` for any other chain of operations; the caller then
reads the sources whole and converts with transformers' own code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..planning.spec import Ranges

Reader = Callable[[str, int | None, Ranges | None], torch.Tensor]


def _op_names(converter) -> list[str]:
    return [type(op).__name__ for op in getattr(converter, "operations", [])]


def _stack(keys: Sequence[str], read: Reader, dim: int | None, ranges: Ranges | None,
           experts: Ranges | None = None) -> torch.Tensor:
    """``stack([source slices], 0)``; ``experts`` picks a subset of the sources (dim 0)."""
    picked = list(keys) if experts is None else [keys[i] for a, b in experts for i in range(a, b)]
    return torch.stack([read(k, dim, ranges) for k in picked], 0)


def sliced_convert(converter, sources: dict[str, list[str]], shapes: dict[str, tuple],
                   dim: int, ranges: Ranges, read: Reader) -> torch.Tensor | None:
    """The concatenation of ``ranges`` along ``dim`` of the converter's output, reading only
    what it needs; ``None`` when the converter is not one this module understands.

    ``sources``: source pattern -> checkpoint keys, in expert order; ``shapes``: key -> shape.
    """
    ops = list(getattr(converter, "operations", []))
    names = _op_names(converter)
    if not ops or names[0] != "MergeModulelist" or getattr(ops[0], "dim", None) != 0:
        return None
    patterns = list(converter.source_patterns)
    if any(p not in sources for p in patterns):
        return None
    src_dim = dim - 1 if dim > 0 else None
    experts = ranges if dim == 0 else None
    src_ranges = None if dim == 0 else ranges
    if names == ["MergeModulelist"] and len(patterns) == 1:
        return _stack(sources[patterns[0]], read, src_dim, src_ranges, experts)
    if names != ["MergeModulelist", "Concatenate"]:
        return None
    cat = ops[1].dim
    if cat == 0:
        return None
    if dim != cat:
        parts = [_stack(sources[p], read, src_dim, src_ranges, experts) for p in patterns]
        return torch.cat(parts, cat)
    sizes = [shapes[sources[p][0]][cat - 1] for p in patterns]
    pieces = []
    for a, b in ranges:
        off = 0
        for p, size in zip(patterns, sizes):
            lo, hi = max(a, off), min(b, off + size)
            if lo < hi:
                pieces.append(_stack(sources[p], read, cat - 1, ((lo - off, hi - off),)))
            off += size
    return torch.cat(pieces, cat) if len(pieces) > 1 else pieces[0]
