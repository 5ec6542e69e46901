"""The one declarative table of model knowledge that cannot be derived from structure.

Everything else about a model is found by the data-flow probe (:mod:`xtp.planning.probe`); fused
layouts come from what the forward does with a fused output (:mod:`xtp.planning.fused`). Each
entry here has a test (tests/planning/test_model_table.py, and the parity suite for its
architecture).

* :data:`CONFIG_ALIASES`: where a config keeps its head counts and head size (a composite
  config: in its text config).
Head counts and widths an attention module holds as attributes (:mod:`xtp.planning.size_roles`)
and its keyword inputs with one slice per head (:mod:`xtp.planning.head_kwargs`) are found from
the forward, not listed.
"""

from __future__ import annotations

from dataclasses import dataclass

#: config attribute names, tried in order
CONFIG_ALIASES: dict[str, tuple[str, ...]] = {
    "num_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads",
                  "encoder_attention_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num"),
    "head_dim": ("head_dim", "d_kv", "attention_head_size"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
}
#: configs whose boolean flag means "one KV head" (multi-query attention)
MULTI_QUERY_FLAGS: tuple[str, ...] = ("multi_query",)


class _PerLayer:
    """Marks a config attribute whose global read raises (a heterogeneous config refuses to
    give a value that varies per layer)."""


PER_LAYER = _PerLayer()


def _read(config, name: str):
    try:
        return getattr(config, name, None)
    except Exception:  # the config refuses a global read of a per-layer value
        return PER_LAYER


def _flag(config, name: str) -> bool:
    value = _read(config, name)
    return value is not PER_LAYER and bool(value)


def config_value(config, key: str, per_layer=None):
    """First present alias of ``key`` in ``config``, else in its text model's config (a
    composite config: a vision-language model's text sizes); ``None`` when absent. An alias the
    config refuses to read globally (it varies per layer) gives ``per_layer`` (default
    ``None``: treated as absent)."""
    for name in CONFIG_ALIASES[key]:
        value = _read(config, name)
        if value is PER_LAYER:
            return per_layer
        if value is not None:
            return value
    try:
        inner = config.get_text_config()
        if inner is None or inner is config:
            return None
        return config_value(inner, key, per_layer)
    except Exception:  # noqa: BLE001 - no config method, ambiguous text or per-layer sizes
        return None


def vocab_size(config):
    """The vocabulary size: the config's own, else its text sub-config's (a multimodal
    config keeps it in ``get_text_config()``); ``None`` when neither has one."""
    return None if config is None else config_value(config, "vocab_size")


def head_shape(config) -> tuple[int, int, int] | None:
    """``(num_heads, num_kv_heads, head_dim)`` from a transformers config, or ``None``."""
    if config is None:
        return None
    heads = config_value(config, "num_heads")
    if not isinstance(heads, int) or heads < 1:
        return None
    kv = config_value(config, "num_kv_heads")
    if any(_flag(config, flag) for flag in MULTI_QUERY_FLAGS) and not _flag(
        config, "new_decoder_architecture"
    ):
        kv = 1
    if not isinstance(kv, int) or kv < 1:
        kv = heads
    head_dim = config_value(config, "head_dim", per_layer=PER_LAYER)
    if head_dim is PER_LAYER:
        return None  # head sizes differ per layer: the forward's views into heads tell them
    if not isinstance(head_dim, int) or head_dim < 1:
        hidden = config_value(config, "hidden_size")
        if not isinstance(hidden, int):
            return None
        head_dim = hidden // heads
    return heads, kv, head_dim


@dataclass(frozen=True)
class ExpertsEntry:
    """Parameter names of fused 3-D MoE experts (transformers >= 5 experts interface, see
    ``transformers.integrations.moe.use_experts_implementation``). Such a module describes its
    own layout with the flags ``has_gate``, ``is_concatenated`` ([gate; up] vs interleaved
    [g0, u0, g1, u1, ...]), ``is_transposed`` ((E, in, out) instead of (E, out, in)) and
    ``has_bias``; xtp reads those flags, and only the names below are fixed knowledge."""

    gate_up: str = "gate_up_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    bias_suffix: str = "_bias"
    flags: tuple[str, ...] = ("has_gate", "is_transposed")
    intermediate_attr: str = "intermediate_dim"


#: the parameter names of fused experts (not to be confused with the role ``Role.EXPERTS``)
EXPERT_PARAMS = ExpertsEntry()


def is_fused_experts(module) -> bool:
    """True for a module following the transformers experts interface (3-D expert tensors)."""
    down = getattr(module, EXPERT_PARAMS.down, None)
    return (all(hasattr(module, f) for f in EXPERT_PARAMS.flags)
            and getattr(down, "dim", lambda: 0)() == 3)

