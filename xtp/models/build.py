"""Building a model skeleton from a config on the meta device (no weight memory)."""

from __future__ import annotations

import torch
from torch import nn


def model_class_for(config, model_class: type | None = None) -> type:
    """The transformers auto class that builds ``config``: causal LM, else seq2seq LM, else
    the bare model. ``model_class`` wins when given."""
    if model_class is not None:
        return model_class
    import transformers

    for auto in ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModel"):
        cls = getattr(transformers, auto)
        if type(config) in cls._model_mapping:
            return cls
    from ..errors import ConfigError

    raise ConfigError(f"transformers has no model class for config {type(config).__name__}; "
                      "pass model_class=... (a transformers model class)")


def meta_model(
    config, model_class: type | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """``model_class`` (or the auto class) built from ``config`` on the meta device."""
    cls = model_class_for(config, model_class)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with torch.device("meta"):
        if hasattr(cls, "from_config"):  # transformers auto classes
            return cls.from_config(config, **kwargs)
        if hasattr(cls, "_from_config"):  # a concrete PreTrainedModel class
            return cls._from_config(config, **kwargs)
        return cls(config)
