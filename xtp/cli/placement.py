"""Placement for the commands that start CPU ranks (``xtp run``, ``xtp bench``, ``xtp env``).

* ``--tp N|auto``: :func:`tp_arg` parses it; :func:`resolve_tp` turns ``auto`` into a size
  from the host's CPU topology (:func:`xtp.accelerators.cpu.placement.choose_tp`), checked
  against the model (a size its heads cannot take falls back to the next smaller one), with
  the one-line reason.
* :func:`local_placement`: the cores each of ``tp`` local ranks would be pinned to, or
  ``None`` where nothing is pinned (``XTP_PIN=0``, or the ranks compute on an accelerator).
* :func:`hint`: the one-line hint when ``--tp N`` is likely slower than another size here.
"""

from __future__ import annotations

import argparse

from ..accelerators.cpu.cpu_topology import CpuTopology, read_topology
from ..accelerators.cpu.placement import (
    Placement,
    choose_tp,
    computes_on_cpu,
    plan_placement,
    tp_hint,
)
from ..accelerators.env import pin_mode
from ..errors import ArgumentError, TPSizeError

AUTO = "auto"


def tp_arg(raw: str) -> int | str:
    """argparse type of ``--tp``: a positive integer or ``auto`` (``>= 1`` is checked by the
    command, so its message names the command's rule)."""
    if raw.strip().lower() == AUTO:
        return AUTO
    try:
        return int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid int value: {raw!r} (give a tensor-parallel size such as 2, or auto)"
        ) from None


def _on_cpu() -> bool:
    from ..accelerators import select

    return computes_on_cpu(select().accelerator)


def resolve_tp(tp: int | str, model: str, topo: CpuTopology | None = None
               ) -> tuple[int, str | None]:
    """``(tp, reason)``: ``tp`` itself with no reason, or for ``auto`` the chosen size and the
    one line that says why.

    Raises:
        ArgumentError: ``auto`` where the ranks do not compute on the CPU (the choice is made
            from the CPU topology; give ``--tp N`` there).
    """
    if tp != AUTO:
        return int(tp), None
    if not _on_cpu():
        raise ArgumentError("--tp auto chooses from the host CPU's topology, but the ranks would "
                            "run on an accelerator here; give --tp N (at most the device count)")
    topo = read_topology() if topo is None else topo
    chosen, why = choose_tp(topo)
    if chosen > 1:
        from .. import plan
        from ..models.builtin import resolve_config

        config = resolve_config(model)
        for size in range(chosen, 0, -1):
            if chosen % size:
                continue
            try:
                if size > 1:
                    plan(config, size)
            except TPSizeError:
                continue
            if size != chosen:
                why += f"; {model} cannot take tp {chosen}, so tp {size}"
                chosen = size
            break
    return chosen, why


def local_placement(tp: int, topo: CpuTopology | None = None) -> Placement | None:
    """Where ``tp`` local ranks would run (:func:`~xtp.accelerators.cpu.placement.plan_placement`),
    or ``None`` where xtp pins nothing (``XTP_PIN=0``, or not on the CPU)."""
    mode = pin_mode()
    if mode == "off" or not _on_cpu():
        return None
    return plan_placement(read_topology() if topo is None else topo, tp, smt=mode == "smt")


def hint(tp: int, topo: CpuTopology | None = None) -> str | None:
    """:func:`~xtp.accelerators.cpu.placement.tp_hint` for ``--tp N`` on the CPU, else ``None``."""
    if tp <= 1 or not _on_cpu():
        return None
    return tp_hint(read_topology() if topo is None else topo, tp)
