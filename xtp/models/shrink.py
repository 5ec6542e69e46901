"""A tiny config for any transformers model type, from its default config (no hub file).

:func:`tiny_config` starts from ``CONFIG_MAPPING[model_type]()`` and sets every size it knows
by a well-known attribute name (or an alias of one, through the config's ``attribute_map``) to a
small value: 2 layers, hidden size 64, 4 attention heads and 2 KV heads (so that tp 3 meets
uneven and replicated heads), head size 16, intermediate size 128, a vocabulary of 101 (divided
by neither 2 nor 3), 64 positions, 4 experts of which 2 per token. A size is only ever made
smaller, never larger. Per-layer lists (``layer_types`` ...) keep one layer of each kind; token
ids past the new vocabulary are folded into it; nested sub-configs (``text_config``,
``vision_config``, ...) are shrunk the same way. Nothing here names a model type: the names are
the attribute names transformers' configs share.

A type that cannot be shrunk raises :class:`ShrinkError` with a one-line reason. Whether the
result really builds (and is really tiny) is the caller's check: build it and count parameters.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import XtpError

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, POSITIONS = 2, 64, 4, 2, 16, 128, 101, 64

_KV_NAMES = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
# attribute name -> tiny value. A name missing from a config is skipped; aliases are followed
# through ``attribute_map``. Grouped by what the number means, not by model.
LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                "decoder_layers", "num_encoder_layers", "num_decoder_layers")
TINY: dict[str, int] = {
    **dict.fromkeys(LAYER_COUNTS, LAYERS),
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "embedding_size",
                     "word_embed_proj_dim", "projection_dim", "hidden_dim"), HIDDEN),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads",
                     "encoder_attention_heads", "decoder_attention_heads"), HEADS),
    **dict.fromkeys(_KV_NAMES, KV_HEADS),
    **dict.fromkeys(("head_dim", "d_kv", "kv_channels", "attention_head_dim", "d_head",
                     "hidden_size_per_layer_input"), HEAD_DIM),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff",
                     "n_inner", "ffn_hidden_size", "inner_hidden_size", "mlp_dim", "d_inner"), FFN),
    **dict.fromkeys(("moe_intermediate_size", "expert_intermediate_size",
                     "shared_expert_intermediate_size", "moe_ffn_hidden_size"), FFN // 2),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "first_k_dense_replace",
                     "n_group", "topk_group", "num_nextn_predict_layers"), 1),
    # multi-head latent attention (low-rank q / kv projections, split rope and nope head parts)
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": HEAD_DIM,
    "qk_nope_head_dim": HEAD_DIM, "v_head_dim": HEAD_DIM, "rotary_dim": 8,
    # sparse attention's indexer (its own heads; the head holds a rope part of
    # qk_rope_head_dim)
    "index_n_heads": HEADS, "index_head_dim": 2 * HEAD_DIM,
    # linear attention / state-space mixers (gated delta net, mamba-style)
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "swa_head_dim",
                     "mamba_d_head", "mamba_d_state", "ssm_state_size", "state_size"), HEAD_DIM),
    **dict.fromkeys(("linear_num_value_heads", "mamba_n_heads"), HEADS),
    "linear_num_key_heads": KV_HEADS, "mamba_d_ssm": HIDDEN,
    "n_groups": KV_HEADS,  # state-space heads sharing one B/C group (like KV heads)
    "attention_window": 16,  # local attention: the input is padded to a multiple of it
    "vocab_size": VOCAB,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len",
                     "max_sequence_length", "seq_length", "max_source_positions"), POSITIONS),
}

# name patterns for the sizes a config names after what they belong to (``<what>_vocab_size``,
# ``max_<what>_position_embeddings`` ...): first match wins, a name in TINY is never matched.
PATTERNS: tuple[tuple[re.Pattern, int], ...] = (
    (re.compile(r"max_\w*position_embeddings$"), POSITIONS),
    (re.compile(r"\w+_(embed_dim|embed_size|embedding_size|embedding_dim)$"), HIDDEN),
    (re.compile(r"\w*(expert|shared)\w*_intermediate_size$"), FFN // 2),
    (re.compile(r"\w+_intermediate_size$"), FFN),
    (re.compile(r"\w+_rank$"), TINY["kv_lora_rank"]),
)
# a head family named by a common prefix: ``<p>_num_heads`` (or ``<p>_n_heads``) and
# ``<p>_head_dim`` both present shrink to HEADS heads of HEAD_DIM; one of them alone (a derived
# ``qk_head_dim``, say) is left as it is.
_HEAD_COUNT = re.compile(r"(\w+)_(num_heads|n_heads)$")


def _pattern_sizes(cls: type, attrs: dict[str, Any], taken: set[str]) -> dict[str, int]:
    """Tiny values for the int attributes of ``attrs`` that PATTERNS or a head family match
    (never one in ``taken`` or in TINY, never a property): ``{name: tiny}``."""
    found: dict[str, int] = {}
    for name in attrs:
        head = _HEAD_COUNT.match(name)
        if head and f"{head.group(1)}_head_dim" in attrs:
            found.setdefault(name, HEADS)
            found.setdefault(f"{head.group(1)}_head_dim", HEAD_DIM)
            continue
        for pattern, tiny in PATTERNS:
            if pattern.match(name):
                found.setdefault(name, tiny)
                break
    return {k: v for k, v in found.items() if k not in taken and k not in TINY
            and not isinstance(getattr(cls, k, None), property)}


class ShrinkError(XtpError):
    """A model type that cannot be built tiny from its default config; the message says why."""


def _config_class(model_type_or_class: str | type) -> type:
    if isinstance(model_type_or_class, type):
        return model_type_or_class
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type_or_class]
    except (KeyError, ImportError, AttributeError) as exc:
        raise ShrinkError(f"no config class for {model_type_or_class!r}: "
                          f"{type(exc).__name__}: {exc}") from exc


def _get(obj, name: str, fallback: Any = None) -> Any:
    """``getattr`` that treats an attribute whose access raises (some configs refuse global
    reads of per-layer values) as missing."""
    try:
        return getattr(obj, name, fallback)
    except Exception:
        return fallback


def _is_config(value: Any) -> bool:
    return hasattr(value, "to_dict") and hasattr(value, "model_type")


def _layer_picks(n: int, lists: list[list]) -> list[int]:
    """Indices of ``LAYERS`` layers out of ``n``: the first layer of each distinct kind seen in
    the per-layer lists, then the earliest others."""
    picks: list[int] = []
    seen: set = set()
    for i in range(n):
        kind = tuple(repr(lst[i]) for lst in lists)
        if kind not in seen:
            seen.add(kind)
            picks.append(i)
    picks = sorted(picks[:LAYERS])
    for i in range(n):
        if len(picks) >= LAYERS:
            break
        if i not in picks:
            picks = sorted(picks + [i])
    return picks


def _layer_index_lists(attrs: dict, taken: dict, n: int, picks: list[int]) -> dict[str, list]:
    """Lists of layer indices among ``n`` layers (a name with ``layer`` in it, ints strictly
    increasing below ``n``, not one entry per layer: ``index_layers=[4, 14]``,
    ``mlp_only_layers=[0, 1]``) renumbered to the ``picks`` kept: the indices of kept layers,
    in their new numbering."""
    new = {old: i for i, old in enumerate(picks)}
    out = {}
    for k, v in attrs.items():
        if (k in taken or "layer" not in k or not isinstance(v, (list, tuple)) or not v
                or len(v) == n or not all(isinstance(x, int) and not isinstance(x, bool)
                                          for x in v)):
            continue
        if all(0 <= a < b < n for a, b in zip(v, v[1:])) and 0 <= v[0] and v[-1] < n:
            out[k] = type(v)(new[x] for x in v if x in new)
    return out


def tiny_kwargs(default, kv_heads: int | None = KV_HEADS) -> dict[str, Any]:
    """The keyword arguments (in the config's own attribute names) that make ``default`` (a
    config instance) tiny; sub-configs are shrunk and passed as config instances.
    ``kv_heads=None``: as many KV heads as attention heads (for models whose attention needs
    that, e.g. latent attention)."""
    cls = type(default)
    amap = dict(getattr(cls, "attribute_map", {}) or {})
    kwargs: dict[str, Any] = {}
    layer_counts: set[int] = set()
    for name, tiny in TINY.items():
        native = amap.get(name, name)
        if native in kwargs or isinstance(getattr(cls, native, None), property):
            continue  # a property is derived from other sizes: it follows them
        value = _get(default, native)
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if name in LAYER_COUNTS and value > 0:  # (a KV head count's tiny value is 2 too)
            layer_counts.add(value)
        if name in _KV_NAMES:
            tiny = HEADS if kv_heads is None else kv_heads
        if value > tiny:
            kwargs[native] = tiny
    vocab = kwargs.get(amap.get("vocab_size", "vocab_size"), _get(default, "vocab_size"))
    attrs = default.to_dict()
    for name, tiny in _pattern_sizes(cls, attrs, set(kwargs)).items():
        value = _get(default, name)
        if isinstance(value, int) and not isinstance(value, bool) and value > tiny:
            kwargs[name] = tiny
    for name, value in attrs.items():
        if name in kwargs:
            continue
        current = _get(default, name, value)
        if ("vocab_size" in name and isinstance(current, int) and not isinstance(current, bool)
                and current > VOCAB):  # every vocabulary: audio, entity, per-layer, padded ...
            kwargs[name] = VOCAB
            continue
        if _is_config(current):
            kwargs[name] = _shrink_instance(current, kv_heads)
        elif (isinstance(vocab, int) and name.endswith(("_token_id", "_token_index"))
              and isinstance(current, int) and not isinstance(current, bool) and current >= vocab):
            kwargs[name] = current % vocab
        elif (isinstance(vocab, int) and name.endswith("_token_id") and isinstance(current, list)
              and all(isinstance(v, int) for v in current)):
            kwargs[name] = [v % vocab for v in current]
    for n in sorted(layer_counts):
        if n <= LAYERS:
            continue
        per_layer = {k: v for k, v in attrs.items()
                     if isinstance(v, (list, tuple)) and len(v) == n and k not in kwargs}
        picks = _layer_picks(n, list(per_layer.values())) if per_layer else list(range(LAYERS))
        for k, v in per_layer.items():
            kwargs[k] = type(v)(v[i] for i in picks)
        kwargs.update(_layer_index_lists(attrs, kwargs, n, picks))
    for native, tiny in list(kwargs.items()):  # per-layer sizes of a shrunk size: capped by it
        if not isinstance(tiny, int) or isinstance(tiny, bool):
            continue
        for k in attrs:
            v = kwargs.get(k, attrs[k])
            if (k.startswith(native + "_per_") and isinstance(v, (list, tuple)) and v
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
                kwargs[k] = type(v)(min(x, tiny) for x in v)
    return kwargs


def _shrink_instance(default, kv_heads: int | None):
    cls = type(default)
    try:
        kwargs = tiny_kwargs(default, kv_heads)
        return cls(**kwargs)
    except ShrinkError:
        raise
    except Exception as exc:  # a config that validates its sizes: say which and why
        raise ShrinkError(f"{cls.__name__} rejects the tiny sizes: "
                          f"{type(exc).__name__}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tiny_config(model_type_or_class: str | type, kv_heads: int | None = KV_HEADS):
    """A tiny config of ``model_type_or_class`` (a ``model_type`` string or a config class),
    with ``kv_heads`` KV heads where the config has such a count (``None``: one per head).

    Raises:
        ShrinkError: the type has no config class here, its default config cannot be built
            (it needs a hub file or a missing package), or it rejects the tiny sizes; the
            message is one line saying which.
    """
    cls = _config_class(model_type_or_class)
    try:
        default = cls()
    except Exception as exc:
        raise ShrinkError(f"its default config cannot be built: {type(exc).__name__}: "
                          f"{_one_line(exc)}") from exc
    return _shrink_instance(default, kv_heads)
