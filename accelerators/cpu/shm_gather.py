"""How :class:`~xtp.accelerators.cpu.shm.ShmCommunicator` lays out an all-gather over its
shared-memory slots, chunk by chunk. Both functions get ``exchange(piece)``: it copies
``piece`` (1-D, at most ``chunk_bytes``) into this rank's slot of the next buffer set, publishes
it, waits for every rank and returns every rank's slot as ``piece.dtype`` (the communicator's
protocol).

* :func:`gather_flat`: each rank's part as one flat run of bytes, chunk after chunk, into the
  output's rows (a gather along the first dimension: parts are consecutive in the output).
* :func:`gather_rows`: a gather along a later dimension, whole rows of every rank per chunk,
  each rank's rows copied straight into their columns of the output (contiguous runs). Moving
  the dimension to the front and back instead would copy the whole tensor transposed twice:
  for vocab-parallel logits of a prefill, 9x the time of the gather itself
  (``bench/cpu_allgather_rows.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Exchange = Callable[[torch.Tensor], list]


def gather_flat(exchange: Exchange, local: torch.Tensor, out: torch.Tensor, sizes: list[int],
                rank: int, chunk_bytes: int) -> None:
    """``local`` (this rank's ``sizes[rank]`` rows, contiguous) into ``out`` (``sum(sizes)``
    rows), ``chunk_bytes`` of every rank's part per exchange."""
    row = math.prod(local.shape[1:]) * local.element_size()
    counts = [s * row for s in sizes]
    offsets = [sum(counts[:i]) for i in range(len(sizes))]
    src = local.view(-1).view(torch.uint8)
    dst = out.view(-1).view(torch.uint8)
    for start in range(0, max(counts), chunk_bytes):
        m = max(0, min(chunk_bytes, counts[rank] - start))
        slots = exchange(src[start:start + m])
        for i, slot in enumerate(slots):
            m = max(0, min(chunk_bytes, counts[i] - start))
            if m:
                dst[offsets[i] + start:offsets[i] + start + m].copy_(slot[:m])


def rows_per_chunk(shape: torch.Size, dim: int, sizes: list[int], element_size: int,
                   chunk_bytes: int) -> int:
    """How many rows (of the dimensions before ``dim``) of every rank fit one slot for a gather
    along ``dim`` with ``sizes`` per rank; 0 when ``dim`` is the first or one row does not fit
    (:func:`gather_flat` then)."""
    inner = math.prod(shape[dim + 1:])
    return chunk_bytes // max(1, max(sizes) * inner * element_size) if dim > 0 else 0


def gather_rows(exchange: Exchange, src: torch.Tensor, dst: torch.Tensor, widths: list[int],
                rows: int) -> None:
    """``src`` ``(outer, widths[rank])`` (this rank's part, flattened around the gathered
    dimension) into ``dst`` ``(outer, sum(widths))``, ``rows`` rows per exchange."""
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    for o0 in range(0, dst.shape[0], rows):
        n = min(rows, dst.shape[0] - o0)
        slots = exchange(src[o0:o0 + n].reshape(-1))
        for i, slot in enumerate(slots):
            if widths[i]:
                dst[o0:o0 + n, offsets[i]:offsets[i] + widths[i]].copy_(
                    slot[:n * widths[i]].view(n, widths[i]))
