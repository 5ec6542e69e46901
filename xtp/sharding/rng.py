"""Random numbers inside tensor-parallel regions: one stream per TP rank (:class:`RegionRNG`)."""

from __future__ import annotations

import hashlib

import torch


def default_generator(device: torch.device) -> torch.Generator | None:
    """The default random generator of ``device`` (``None`` when its backend has none)."""
    if device.type == "cpu":
        return torch.default_generator
    try:
        mod = torch.get_device_module(device.type)
        gens = mod.default_generators
        return gens[device.index if device.index is not None else mod.current_device()]
    except (AttributeError, RuntimeError, IndexError):
        return None


class RegionRNG:
    """Random numbers drawn inside a tensor-parallel region (from a column layer's output to
    its row layer's input: activations split by heads or features, e.g. attention-probability
    dropout) come from a stream of their own, one per TP rank (Megatron-LM's model-parallel RNG).

    Without it every rank draws region randomness from the default generator, and ranks with
    different local head counts (6 heads over 4 ranks: 2, 2, 1, 1) consume different amounts
    of it; the dropout on replicated activations after the row layer then differs across the TP
    group (silently wrong training), and with equal counts the ranks' per-head masks are copies.

    One instance per sharded model (``tp_rng`` of its column and row layers); only in training
    mode. Entering (column layer) seeds the device's default generator from a hash of its state
    and the TP rank; leaving (row layer) puts the state back and, if the region drew anything,
    advances it by one draw (identically on every TP rank) so the next region gets another
    seed. Everything is a function of the default generator's state: seeding it
    (:func:`xtp.training.seed_everything`) seeds the regions, a checkpoint of it resumes them,
    and activation-checkpointing recomputation (which restores it) redraws the same masks. A
    region that draws nothing leaves the default stream exactly as the unsharded model's.
    Not under ``torch.compile`` tracing (region draws then come from the default stream).
    """

    def __init__(self, tp_rank: int) -> None:
        self.tp_rank = tp_rank
        self._inside: tuple | None = None

    def enter(self, device: torch.device) -> None:
        if self._inside is not None or torch.compiler.is_compiling():
            return
        gen = default_generator(device)
        if gen is None:
            return
        main = gen.get_state()
        digest = hashlib.blake2b(main.numpy().tobytes() + self.tp_rank.to_bytes(4, "little"),
                                 digest_size=8).digest()
        gen.manual_seed(int.from_bytes(digest, "little") >> 1)
        self._inside = (gen, main, gen.get_state())

    def leave(self) -> None:
        if self._inside is None:
            return
        gen, main, seeded = self._inside
        self._inside = None
        drew = not torch.equal(gen.get_state(), seeded)
        gen.set_state(main)
        if drew:
            torch.empty(1, device=gen.device).uniform_(generator=gen)
