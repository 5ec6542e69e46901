"""Built-in model configs (no download): a tiny Llama for demos and tests, a ~1B Llama and an
8B-class Llama (Llama-3-8B's shape) for benchmarks. Weights are random but deterministic
(seeded), so every rank builds the same model."""

from __future__ import annotations

import os

import torch

BUILTIN_CONFIGS: dict[str, dict] = {
    # 12 heads / 6 KV heads: tp 1, 2, 3, 4, 6 all work; vocabulary that divides by nothing
    "tiny-llama": dict(model_type="llama", hidden_size=192, intermediate_size=512,
                       num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=6,
                       vocab_size=1031, max_position_embeddings=512, tie_word_embeddings=False),
    # the 0.85B Llama-style model used by the CPU benchmarks
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False),
    # an 8B-class model in Llama-3-8B's shape (16 GB in bf16): the server benchmarks
    "llama-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                     tie_word_embeddings=False),
}
DEFAULT_MODEL = "tiny-llama"
SEED = 1234


def resolve_config(model: str):
    """A transformers config for MODEL: a built-in name, a config JSON file, or a checkpoint
    folder (its config.json); checked (:mod:`xtp.models.config`), so a bad one is a
    :class:`~xtp.errors.ConfigError` naming the file and the field."""
    from ..errors import ArgumentError
    from .config import config_from_dict, config_from_file, load_folder_config

    if not isinstance(model, str):
        raise ArgumentError(f"MODEL must be a string (a built-in name, a config JSON file or a "
                            f"checkpoint folder), got {type(model).__name__}")
    if model in BUILTIN_CONFIGS:
        return config_from_dict(dict(BUILTIN_CONFIGS[model]), f"built-in {model!r}")
    if os.path.isdir(model):
        return load_folder_config(model)
    if os.path.isfile(model):
        return config_from_file(model)
    raise ArgumentError(
        f"MODEL {model!r} is neither a built-in ({', '.join(BUILTIN_CONFIGS)}), a config "
        "JSON file nor a checkpoint folder"
    )


def build_random(config, dtype: torch.dtype = torch.float32):
    """The model for ``config`` with seeded random weights (identical on every rank)."""
    from .build import model_class_for

    torch.manual_seed(SEED)
    model = model_class_for(config).from_config(config, dtype=dtype)
    return model.eval()
