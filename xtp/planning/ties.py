"""Tied weights (one parameter shared by several modules, e.g. input embedding and LM head).

Tied modules must be sharded identically: a tied module the probe never called follows its
partners; if the users of one weight would be split differently (or some not at all), all of
them, and the row/column partners of any of them, stay replicated; so do the users of a weight
that a module of a kind xtp does not shard also holds. In ``bytes_per_rank`` a
shared weight counts once, for its first user.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from .draft import Draft
from .render import collapse
from .spec import ModuleSpec, Role, Split


def _follow_partners(draft: Draft, names: list[str]) -> None:
    """A tied module never called in the probe gets the spec of a partner of its kind."""
    for n in names:
        partner = next((draft.specs[m] for m in names if m in draft.specs
                        and draft.kinds[m] == draft.kinds[n]), None)
        if n not in draft.graph.order and n not in draft.specs and partner is not None:
            draft.specs[n] = ModuleSpec(
                n, partner.role, partner.kind, f"tied to {collapse(partner.name)}",
                partner.split, partner.full, partner.ranges, partner.layout,
                weight_shape=partner.weight_shape, nbytes=partner.nbytes)


def check_ties(draft: Draft) -> None:
    """Make the users of every shared weight agree (see the module docstring)."""
    by_param: dict[int, list[str]] = defaultdict(list)
    for name in draft.kinds:
        by_param[id(draft.modules[name].weight)].append(name)
    # modules of no kind xtp shards that hold one of those weights too (a custom embedding
    # tied to the LM head): they keep the whole weight, so its other users must as well
    foreign: dict[int, int] = defaultdict(int)
    for name, mod in draft.modules.items():
        if name not in draft.kinds:
            for p in mod.parameters(recurse=False):
                if id(p) in by_param:
                    foreign[id(p)] += 1
    for key, names in by_param.items():
        if len(names) + foreign[key] < 2:
            continue
        _follow_partners(draft, names)
        specs = [draft.specs.get(n) for n in names]
        sharded = [s for s in specs if s is not None and s.is_sharded]
        if not sharded:
            continue
        ranges = {s.ranges for s in sharded}
        if len(sharded) != len(names) + foreign[key] or len(ranges) != 1:
            groups = {s.group for s in sharded if s.group}
            partners = [s.name for s in draft.specs.values() if s.group in groups]
            for n in [*names, *partners]:
                spec = draft.specs.get(n)  # a tied module may have no spec yet
                if spec is not None and spec.role == Role.NORM:  # split with its pair: whole again
                    del draft.specs[n]
                    continue
                draft.specs[n] = draft.spec(n, Role.REPLICATE, "tied weight shared with a module "
                                            "that cannot be sharded the same way"
                                            if n in names else "its row/column partner is "
                                            "kept whole (tied weight)")
            draft.notes.append(f"tied weights {', '.join(names)} kept replicated")


def count_tied_once(draft: Draft, specs: list[ModuleSpec]) -> list[ModuleSpec]:
    """A weight shared by several modules counts in bytes_per_rank once (its first user)."""
    seen: set[int] = set()
    out = []
    for s in specs:
        w = getattr(draft.modules[s.name], "weight", None)
        if w is not None and id(w) in seen:
            bias = getattr(draft.modules[s.name], "bias", None)
            if bias is None:
                s = dataclasses.replace(s, nbytes=(0,) * draft.tp)
            else:
                per = [s.local_extent(r) if s.split == Split.OUT else bias.numel()
                       for r in range(draft.tp)]
                s = dataclasses.replace(
                    s, nbytes=tuple(n * bias.element_size() for n in per))
        elif w is not None:
            seen.add(id(w))
        out.append(s)
    return out
