"""Which checkpoint tensor fills which model tensor.

Checkpoint keys are not always the model's ``state_dict()`` names: a checkpoint of the bare
model lacks the ``base_model_prefix`` ("model.") a ``ForCausalLM`` adds, transformers 5 renames
legacy names (``LayerNorm.gamma``, ``block_sparse_moe``) and merges per-expert tensors into one
parameter (``experts.*.w1.weight`` -> ``experts.gate_up_proj``), and tied weights
(``lm_head.weight`` with ``tie_word_embeddings``) are saved once. The mapping reuses
transformers' own conversion rules (``conversion_mapping`` / ``rename_source_key``) where they
exist, so a key means here what it means to ``from_pretrained``.

Result: every unique model tensor (parameters and persistent buffers, tied aliases grouped) is
either read directly from one checkpoint key (``direct``) or produced by a transformers
converter from several keys (``converted``, read whole then converted), or is missing.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from ..errors import CheckpointError


@dataclass
class Converted:
    """A transformers ``WeightConverter`` applied to ``sources`` (checkpoint key, pattern)."""

    converter: object
    first_target: str
    sources: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class KeyMap:
    direct: dict[str, str] = field(default_factory=dict)       # model key -> checkpoint key
    converted: dict[str, Converted] = field(default_factory=dict)  # first target -> group
    unexpected: list[str] = field(default_factory=list)

    def targets(self) -> set[str]:
        out = set(self.direct)
        for group in self.converted.values():
            out |= set(converter_targets(group))
        return out


def _natural(key: str):
    """transformers' own key order (experts 0, 1, ..., 10), so converters stack alike."""
    try:
        from transformers.core_model_loading import dot_natural_key
    except ImportError:
        return tuple((0, int(p), "") if p.isascii() and p.isdigit() else (1, 0, p)
                     for p in key.split("."))
    return dot_natural_key(key)


def _transformers_rules(model: nn.Module):
    """(renamings, converters, rename function) from transformers >= 5, else None."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:
        return None
    try:
        rules = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - a model transformers has no mapping for
        rules = []
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    return renamings, converters, rename_source_key


def converter_targets(group: Converted) -> list[str]:
    pats = group.converter.target_patterns
    return [group.first_target.replace(pats[0], p) for p in pats]


def _ignore_unexpected(model: nn.Module) -> re.Pattern | None:
    pats = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    names = [n for n, _ in model.named_buffers()]
    if any(n.endswith("rotary_emb.inv_freq") for n in names):
        pats.add(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in names):
        pats.add(r"(^|\.)position_ids$")
    return re.compile("|".join(f"({p})" for p in pats)) if pats else None


def build_keymap(model: nn.Module, ckpt_keys: Iterable[str]) -> KeyMap:
    """Map ``ckpt_keys`` onto ``model``'s state-dict names (see the module docstring)."""
    meta_sd = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or None
    rules = _transformers_rules(model)
    km = KeyMap()
    by_pattern = {p: c for c in (rules[1] if rules else []) for p in c.source_patterns}
    for key in sorted(ckpt_keys, key=_natural):
        pattern = None
        if rules is not None:
            renamings, converters, rename = rules
            target, pattern = rename(key, renamings, converters, prefix, meta_sd)
            if target not in meta_sd and key in meta_sd:
                target, pattern = rename(key, [], [], prefix, meta_sd)
        else:
            target = _strip_or_add_prefix(key, prefix, meta_sd)
        if target not in meta_sd:
            km.unexpected.append(key)
        elif pattern is None:
            km.direct.setdefault(target, key)
        else:
            group = km.converted.get(target)
            if group is None:
                group = km.converted[target] = Converted(copy.deepcopy(by_pattern[pattern]), target)
            group.sources.append((key, pattern))
    ignore = _ignore_unexpected(model)
    if ignore is not None:
        km.unexpected = [k for k in km.unexpected if not ignore.search(k)]
    return km


def _strip_or_add_prefix(key: str, prefix: str | None, meta_sd: dict) -> str:
    if key in meta_sd or not prefix:
        return key
    if key.startswith(prefix + ".") and key[len(prefix) + 1:] in meta_sd:
        return key[len(prefix) + 1:]
    if f"{prefix}.{key}" in meta_sd:
        return f"{prefix}.{key}"
    return key


def tied_sources(model: nn.Module) -> dict[str, str]:
    """``{tied target name: source name}`` (transformers' ``all_tied_weights_keys``)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        return dict(tied)
    return {}


def choose_alias(aliases: list[str], available: Callable[[str], bool],
                 tied: dict[str, str]) -> str | None:
    """The alias of a (possibly tied) tensor to read: a tie source before a tie target."""
    present = [a for a in aliases if available(a)]
    if not present:
        return None
    sources = [a for a in present if a not in tied]
    return (sources or present)[0]


def raise_unexpected(km: KeyMap, file_of: Callable[[str], str], folder) -> None:
    if km.unexpected:
        shown = ", ".join(f"{k!r} (in {file_of(k)})" for k in km.unexpected[:5])
        more = f" and {len(km.unexpected) - 5} more" if len(km.unexpected) > 5 else ""
        raise CheckpointError(
            f"the checkpoint in {folder} has tensors the model does not: {shown}{more}. It was "
            "saved from another architecture or config; pass the matching model_class, or fix "
            "config.json")
