"""Reading and checking model configs: the one place user configs enter xtp.

Every path that takes a config goes through here: ``xtp plan/run/verify/bench MODEL`` (a config
JSON file or a checkpoint folder, :func:`xtp.models.builtin.resolve_config`), ``from_pretrained``,
``preshard`` and ``gather`` (a folder's ``config.json``, :func:`load_folder_config`) and
``xtp.plan(config)`` (a config object, :func:`check_config`). Whatever is wrong (no
``config.json``, a file that is not JSON or not a JSON object, a missing or unknown
``model_type``, a value transformers' own validation rejects, head counts or sizes that are not
positive integers, query heads that KV heads do not divide) is a
:class:`~xtp.errors.ConfigError` naming the file and the field, raised before any model is built
or any file is written; transformers' and huggingface_hub's exceptions never reach the user.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError

#: config attributes (aliases through transformers' ``attribute_map`` included) that, when the
#: config has them and they are set, must be positive integers: the shapes a plan splits.
SIZE_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "num_hidden_layers", "vocab_size")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s message on one line (transformers' validation errors span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path``; ConfigError when unreadable, not JSON or not an object."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {one_line(exc)}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}); fix it or save the config again with "
                          "config.save_pretrained()") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} holds a JSON {type(data).__name__}, not an object of "
                          'config fields like {"model_type": "llama", "hidden_size": ...}')
    return data


def _model_type(spec: dict, source: str) -> str:
    import transformers

    model_type = spec.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source} has no model_type; add one, e.g. \"model_type\": \"llama\"")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not known to transformers "
            f"{transformers.__version__}; fix model_type (e.g. llama, mistral, qwen2) or "
            "install a transformers that has this model")
    return model_type


def config_from_dict(spec: dict, source: str):
    """The transformers config for the fields ``spec`` (read from ``source``), checked."""
    import transformers

    model_type = _model_type(spec, source)
    _check_sizes(spec.get, source)  # before transformers, which may divide by them
    fields = {k: v for k, v in spec.items() if k != "model_type"}
    try:
        config = transformers.CONFIG_MAPPING[model_type](**fields)
    except Exception as exc:  # ValueError, TypeError, huggingface_hub validation errors, ...
        raise ConfigError(f"{source} is rejected by transformers: "
                          f"{one_line(exc).rstrip('.')}; fix that field") from exc
    return check_config(config, source)


def config_from_file(path: str | os.PathLike):
    """The config in the JSON file ``path`` (as ``xtp plan FILE`` takes it), checked."""
    path = Path(path)
    return config_from_dict(read_json_object(path, "config file"), f"config file {path}")


def load_folder_config(folder: str | os.PathLike):
    """``config.json`` of a checkpoint folder through transformers' ``AutoConfig`` (local files
    only, no hub), checked; ConfigError naming the folder when it has none or it is bad."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        where = "is not a folder, so it" if not folder.is_dir() else ""
        raise ConfigError(f"{folder} {where} has no config.json; give a checkpoint folder "
                          "(save the model with save_pretrained(), or copy its config.json "
                          "next to the weights)".replace("  ", " "))
    source = f"{path}"
    spec = read_json_object(path, "config")
    _model_type(spec, source)
    _check_sizes(spec.get, source)
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # OSError, ValueError, huggingface_hub validation errors, ...
        raise ConfigError(f"{source} is rejected by transformers: "
                          f"{one_line(exc).rstrip('.')}; fix that field") from exc
    return check_config(config, source)


def _bad_size(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or value < 1


def _check_sizes(get, source: str) -> None:
    """Each of :data:`SIZE_FIELDS` that ``get(field)`` gives (not None) is a positive int."""
    for field in SIZE_FIELDS:
        value = get(field)
        if value is not None and _bad_size(value):
            raise ConfigError(f"{source}: {field} must be a positive integer, got {value!r}; "
                              "fix it in the config")


def check_config(config, source: str | None = None):
    """``config`` itself when the sizes a plan splits are usable; ConfigError otherwise.

    Checks, on the text config of multimodal models too: each of :data:`SIZE_FIELDS` the config
    has and sets is a positive integer, and the KV heads divide the query heads.
    """
    source = source or f"the {type(config).__name__}"
    if not hasattr(config, "to_dict") or not hasattr(config, "model_type"):
        raise ConfigError(f"{source} is not a transformers config (a PretrainedConfig); build "
                          "one with transformers.AutoConfig or pass a model")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in {id(config): config, id(text): text}.values():
        _check_sizes(lambda field, c=cfg: getattr(c, field, None), source)
        heads = getattr(cfg, "num_attention_heads", None)
        kv = getattr(cfg, "num_key_value_heads", None)
        if heads and kv and heads % kv:
            raise ConfigError(f"{source}: num_key_value_heads={kv} does not divide "
                              f"num_attention_heads={heads}; each KV head serves a whole group "
                              "of query heads: fix one of them")
    return config
