"""Where the derived plan differs from transformers' own ``base_model_tp_plan`` (a config's
declared tensor-parallel styles): one line per differing module pattern, for the reader; the
plan itself never follows it."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from .render import collapse
from .spec import ModuleSpec, Role

#: transformers' tp_plan style -> the xtp role it amounts to
STYLE_ROLES = {"colwise": Role.COLUMN, "rowwise": Role.ROW, "packed_colwise": Role.COLUMN,
               "embedding_rowwise": Role.VOCAB_EMBEDDING, "colwise_gather_output": Role.COLUMN,
               "rowwise_split_input": Role.ROW}


def compare_tp_plan(model: nn.Module, config, specs: Iterable[ModuleSpec]) -> list[str]:
    """``"<module>: transformers says <style>, xtp chose <role> (<reason>)"`` per difference
    (collapsed module names, each once)."""
    tp_plan = getattr(config, "base_model_tp_plan", None) or {}
    if not tp_plan:
        return []
    base = getattr(model, "base_model_prefix", "")
    diffs = []
    seen = set()
    for s in specs:
        rel = s.name[len(base) + 1:] if base and s.name.startswith(base + ".") else s.name
        for pattern, style in tp_plan.items():
            if (fnmatch.fnmatchcase(rel, pattern) and style in STYLE_ROLES
                    and STYLE_ROLES[style] != s.role):
                key = (collapse(s.name), style, s.role)
                if key not in seen:
                    seen.add(key)
                    diffs.append(f"{collapse(s.name)}: transformers says {style}, xtp "
                                 f"chose {s.role} ({s.reason})")
    return diffs
