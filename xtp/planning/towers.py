"""Encoder towers the text forward does not reach: audio and vision encoders of multimodal models.

The probe runs the model on token ids only, so a sub-model that encodes another modality (an
audio encoder fed ``input_features``, a vision encoder fed ``pixel_values``) never runs in it
and would stay whole. A *tower* is a sub-module, outermost of its kind, that is a model of its
own: it has a ``config`` and a main input (its ``main_input_name``, the transformers convention,
else its forward's first parameter) that is audio features, pixels or raw audio (or
``hidden_states`` of a width its config names ``input_dim``: frames of features already
extracted), and none of its layers ran in the model's probe.

Each tower is planned as a model of its own: its forward is probed on a fake input of that
name (shapes from the tower's config: :func:`input_shapes`), its head counts come from its own
config (or its forward), and its row/column pairs (attention and MLP blocks) are split by the
same rules as the text model's (:func:`xtp.planning.pairs.plan_pairs`). Anything else in it
(convolution front-ends, position tables) stays whole. A tower that cannot be probed, or whose
pairs cannot be split at this tp size, stays whole with a note saying why.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import torch
from torch import nn

from ..errors import XtpError
from . import model_table as mt
from .draft import Draft, _head_bias_tables
from .fused import infer_head_shape
from .pairs import plan_pairs
from .trace import run_probe
from .weights import weight_kind

#: main inputs xtp can make from a tower's config (shapes: :func:`input_shapes`)
MODALITY_INPUTS = ("input_features", "pixel_values", "input_values")
#: a main input xtp can make only when the config names its width ``input_dim``
FEATURE_FRAMES = "hidden_states"


def _int(value) -> int | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        return value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def main_input(module: nn.Module) -> str | None:
    """The name of ``module``'s main input: its ``main_input_name`` when its forward takes it,
    else its forward's first parameter; ``None`` unless one xtp can make
    (:data:`MODALITY_INPUTS`, or :data:`FEATURE_FRAMES` when the module's config has an
    ``input_dim``)."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    name = getattr(module, "main_input_name", None)
    name = name if name in params else (params[0] if params else None)
    if name == FEATURE_FRAMES:
        return name if _int(getattr(getattr(module, "config", None), "input_dim", None)) else None
    return name if name in MODALITY_INPUTS else None


def tower_inputs(tower: nn.Module, name: str, x: torch.Tensor) -> dict:
    """Keyword inputs of ``tower`` for main input ``x`` (named ``name``), with an all-ones
    ``<name>_mask`` of shape (batch, last dimension of ``x``) where the forward takes one."""
    inputs = {name: x}
    if f"{name}_mask" in inspect.signature(tower.forward).parameters:
        inputs[f"{name}_mask"] = torch.ones((x.shape[0], x.shape[-1]), dtype=torch.long,
                                            device=x.device)
    return inputs


def input_shapes(tower: nn.Module) -> list[tuple[int, ...]]:
    """Candidate shapes (batch 1) of ``tower``'s main input, most likely first, from sizes its
    config names: ``input_features`` (1, num_mel_bins, frames) with frames twice or once
    ``max_source_positions`` (strided convolutions in front) or 64; ``pixel_values``
    (1, num_channels, image_size, image_size); ``input_values`` (1, samples) with samples 16 x
    the product of ``conv_stride``; ``hidden_states`` (1, 64, input_dim). Empty when the config
    lacks the sizes."""
    config, name = tower.config, main_input(tower)
    if name == "input_features":
        mels = _int(getattr(config, "num_mel_bins", None))
        pos = _int(getattr(config, "max_source_positions", None))
        frames = ([2 * pos, pos] if pos else []) + [64]
        return [(1, mels, f) for f in frames] if mels else []
    if name == "pixel_values":
        chans, size = (_int(getattr(config, k, None)) for k in ("num_channels", "image_size"))
        return [(1, chans, size, size)] if chans and size else []
    if name == "input_values":
        strides = getattr(config, "conv_stride", None)
        if isinstance(strides, (list, tuple)) and all(isinstance(s, int) for s in strides):
            return [(1, 16 * math.prod(strides))]
    if name == FEATURE_FRAMES:
        return [(1, 64, _int(config.input_dim))]
    return []


def is_tower(module: nn.Module) -> bool:
    """A sub-model fed another modality: a ``config`` and a main input xtp can make."""
    return (getattr(module, "config", None) is not None
            and hasattr(module, "main_input_name") and main_input(module) is not None)


def find_towers(model: nn.Module, reached: set[str]) -> list[str]:
    """Outermost towers of ``model`` (not the model itself) none of whose layers is in
    ``reached`` (the layers the model's probe ran)."""
    found: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(t + ".") for t in found) or not is_tower(mod):
            continue
        if not any(n == name or n.startswith(name + ".") for n in reached):
            found.append(name)
    return found


def _inputs(shape: tuple[int, ...]):
    def build(tower: nn.Module, device: torch.device) -> dict:
        dtype = next(tower.parameters()).dtype
        return tower_inputs(tower, main_input(tower),
                            torch.zeros(shape, dtype=dtype, device=device))
    return build


def probe_tower(tower: nn.Module):
    """(probe graph, input shape) of ``tower`` on the first candidate shape its forward runs
    on; ``None`` when it runs on none."""
    for shape in input_shapes(tower):
        try:
            return run_probe(tower, _inputs(shape)), shape
        except XtpError:
            continue
    return None


def _relative_rules(draft: Draft, prefix: str) -> dict:
    cut = len(prefix) + 1
    return {n[cut:]: v for n, v in draft.rules.items() if n.startswith(prefix + ".")}


def _merge(draft: Draft, sub: Draft, prefix: str) -> None:
    """The tower's decisions, its module names made full (``prefix.`` in front)."""
    full = lambda n: f"{prefix}.{n}" if n else prefix  # noqa: E731
    for name, spec in sub.specs.items():
        draft.specs[full(name)] = dataclasses.replace(
            spec, name=full(name), group=spec.group and full(spec.group))
    for name, why in sub.kept_whole.items():
        draft.kept_whole[full(name)] = why
    draft.attr_updates += [dataclasses.replace(u, module=full(u.module))
                           for u in sub.attr_updates]
    draft.local_configs += [(full(n), v) for n, v in sub.local_configs]
    draft.head_sliced += [(full(h[0]), *h[1:]) for h in sub.head_sliced]
    draft.partial_grads += [full(p) for p in sub.partial_grads]
    draft.collectives += [dataclasses.replace(c, source=full(c.source))
                          for c in sub.collectives]
    for text in sub.notes:
        draft.note(f"{prefix}: {text}")


def plan_towers(draft: Draft) -> None:
    """Split the attention and MLP pairs of every tower the model's probe did not reach."""
    towers = find_towers(draft.model, set(draft.graph.order))
    # the text pairs' head-count updates reach only modules their forward runs: none in a
    # tower (a pair with no common parent module would otherwise update every module)
    inside = lambda n: any(n == t or n.startswith(t + ".") for t in towers)  # noqa: E731
    draft.attr_updates[:] = [u for u in draft.attr_updates if not inside(u.module)]
    draft.local_configs[:] = [c for c in draft.local_configs if not inside(c[0])]
    for prefix in towers:
        if any(n.startswith(prefix + ".") for n in draft.specs):
            continue
        tower = draft.modules[prefix]
        probed = probe_tower(tower)
        if probed is None:
            draft.note(f"{prefix} kept whole: its forward runs on no {main_input(tower)} "
                       "xtp can make from its config")
            continue
        graph, shape = probed
        modules = dict(tower.named_modules())
        kinds = {n: k for n, m in modules.items() if (k := weight_kind(m))}
        heads = mt.head_shape(tower.config) or infer_head_shape(graph)
        sub = Draft(tower, draft.tp, tower.config, modules, kinds, graph,
                    _relative_rules(draft, prefix), heads,
                    _head_bias_tables(modules, kinds, heads, tower.config))
        try:
            plan_pairs(sub)
        except XtpError as exc:
            draft.note(f"{prefix} kept whole: {' '.join(str(exc).split())}")
            continue
        _merge(draft, sub, prefix)
        if sub.specs:
            draft.tower_inputs.append((prefix, main_input(tower), shape))

