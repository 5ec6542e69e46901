"""How a plan reads to people: the ``print(plan)`` table, collapsed module names, byte sizes.

Imports nothing from the rest of xtp (``spec.ShardPlan.__str__`` calls :func:`render_plan`), so
the plan is duck-typed here: any object with the fields of a
:class:`~xtp.planning.spec.ShardPlan`.
"""

from __future__ import annotations

import re
from collections import defaultdict

_LAYER_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def collapse(name: str) -> str:
    """``model.layers.11.mlp`` -> ``model.layers.*.mlp``."""
    return _LAYER_INDEX.sub(".*", name)


def fmt_bytes(n: int) -> str:
    """``n`` bytes in B, KiB, MiB, GiB or TiB (one decimal above bytes): ``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _module_lines(plan) -> list[str]:
    """The module table: one line per (collapsed name, role, layout, split, per-rank extents,
    reason), with how many modules share it."""
    rows: dict[tuple, int] = defaultdict(int)
    for s in plan.specs:
        key = (collapse(s.name), s.role, s.layout, s.split,
               tuple(s.local_extent(r) for r in range(plan.tp_size)) if s.is_sharded
               else None, s.reason)
        rows[key] += 1
    w = max([len(k[0]) for k in rows] + [6])
    lines = [f"{'module':<{w}}  {'n':>3}  {'role':<15} {'split':<5} {'per rank':<16} reason"]
    for key, n in rows.items():
        name, role, layout, split, extents, reason = key
        role_s = role + (f"[{layout}]" if layout else "")
        ext = "/".join(map(str, extents)) if extents else "-"
        lines.append(f"{name:<{w}}  {n:>3}  {role_s:<15} {split or '-':<5} {ext:<16} {reason}")
    return lines


def _attr_update_lines(plan) -> list[str]:
    if not plan.attr_updates:
        return []
    lines = ["", "attribute updates (per rank):"]
    seen = set()
    for u in plan.attr_updates:
        key = (collapse(u.module), u.attr, u.values)
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"  {collapse(u.module)}.{u.attr}: {u.full} -> "
                     f"{'/'.join(map(str, u.values))}")
    return lines


def _head_sliced_lines(plan) -> list[str]:
    """Keyword inputs cut to each rank's heads: ``module kwarg (layout): heads a-b / c-d``."""
    if not plan.head_sliced_kwargs:
        return []
    lines = ["", "per-head keyword inputs, cut to each rank's heads:"]
    seen = set()
    for module, kwarg, layout, heads, _ in plan.head_sliced_kwargs:
        key = (collapse(module), kwarg, layout, heads)
        if key in seen:
            continue
        seen.add(key)
        ranks = " / ".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in heads)
        lines.append(f"  {collapse(module)} {kwarg} ({layout}): heads {ranks}")
    return lines


def render_plan(plan) -> str:
    """The table ``print(plan)`` shows for a :class:`~xtp.planning.spec.ShardPlan`: one row per
    module (repeated layers collapsed), attribute updates, per-head keyword inputs, bytes per
    rank, collectives, notes."""
    head = f"ShardPlan: tp_size={plan.tp_size}, model_type={plan.model_type}"
    if plan.head_shape:
        h, k, d = plan.head_shape
        head += f", heads={h}, kv_heads={k}, head_dim={d}"
    lines = [head, ""]
    lines += _module_lines(plan)
    lines += _attr_update_lines(plan)
    lines += _head_sliced_lines(plan)
    lines += ["", "bytes per rank: " + ", ".join(
        f"rank {r}: {fmt_bytes(plan.bytes_per_rank(r))}" for r in range(plan.tp_size))]
    counts = plan.collective_counts()
    lines.append("collectives per forward: " + (
        ", ".join(f"{n} x {op}" for op, n in sorted(counts.items())) or "none"))
    for note in plan.notes:
        lines.append(f"note: {note}")
    for diff in plan.tp_plan_differences:
        lines.append(f"differs from transformers' tp_plan: {diff}")
    return "\n".join(lines)
