"""Rebuilding the buffers a checkpoint does not hold (rotary ``inv_freq``, ``position_ids``...).

A model built on the meta device has meta buffers. Non-persistent buffers are not in any
checkpoint, so they must be computed again, exactly as a normal ``from_pretrained`` does:

1. transformers models: give each such buffer real (empty) storage on the target device, mark
   every parameter and loaded buffer as initialised, and run the model's own
   ``initialize_weights()`` (its ``_init_weights`` recomputes rotary frequencies from the config,
   with any rope scaling, and position ids). This is the very code path transformers' loader
   uses, so the values are bit-identical to a normally loaded model.
2. anything left unset after that (a buffer ``_init_weights`` does not know, a plain tensor
   attribute such as transformers 4 GPT-J's ``embed_positions``, or a model that is not a
   transformers ``PreTrainedModel``) is taken from a second construction of the model in which
   parameters go to the meta device and everything else is computed for real on the CPU, the
   way the module's ``__init__`` computes it.

Unset buffers are detected with a sentinel fill (NaN, or the integer minimum) before step 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import CheckpointError


def non_persistent_buffers(model: nn.Module, extra: frozenset[str] = frozenset()
                           ) -> list[tuple[str, nn.Module, str]]:
    """``(full name, owning module, attribute)`` of every non-persistent buffer (and of the
    buffers named in ``extra``); a buffer shared by two modules is listed under each."""
    out = []
    for mname, mod in model.named_modules(remove_duplicate=False):
        for bname, buf in mod._buffers.items():
            full = f"{mname}.{bname}" if mname else bname
            if buf is not None and (bname in mod._non_persistent_buffers_set or full in extra):
                out.append((full, mod, bname))
    return out


def _sentinel_fill(t: torch.Tensor) -> bool:
    """Fill ``t`` with a value no initialiser writes; False for dtypes with no such value."""
    if t.is_floating_point():
        t.fill_(float("nan"))
        return True
    if t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8):
        t.fill_(torch.iinfo(t.dtype).min)
        return True
    return False


def _still_sentinel(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return False
    if t.is_floating_point():
        return bool(torch.isnan(t).all())
    return bool((t == torch.iinfo(t.dtype).min).all())


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Inside: every parameter a module registers is moved to the meta device at once (its
    untouched CPU allocation is freed); buffers stay real. As accelerate's
    ``init_empty_weights(include_buffers=False)``."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            cls = type(param)
            self._parameters[name] = cls(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def tensor_attributes(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(full name, module, attribute)`` of plain tensor attributes (neither parameter nor
    buffer) that are still on the meta device."""
    out = []
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr, v in vars(mod).items():
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.is_meta:
                out.append((f"{mname}.{attr}" if mname else attr, mod, attr))
    return out


def constructed_buffers(config, model_class: type | None, dtype: torch.dtype | None) -> dict:
    """Every buffer and plain tensor attribute of a fresh construction of the model
    (parameters on meta, the rest real on the CPU): ``{full name: tensor}``."""
    from ..models.build import model_class_for

    cls = model_class_for(config, model_class)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with _params_on_meta(), torch.device("cpu"):
        if hasattr(cls, "from_config"):
            model = cls.from_config(config, **kwargs)
        elif hasattr(cls, "_from_config"):
            model = cls._from_config(config, **kwargs)
        else:
            model = cls(config)
    out = dict(model.named_buffers(remove_duplicate=False))
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr, v in vars(mod).items():
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
                out.setdefault(f"{mname}.{attr}" if mname else attr, v)
    return out


def rebuild_non_persistent(model: nn.Module, device: torch.device, config=None,
                           model_class: type | None = None, dtype: torch.dtype | None = None,
                           extra: frozenset[str] = frozenset()) -> list[str]:
    """Give every non-persistent buffer of ``model`` (and the persistent ones named in
    ``extra``, e.g. absent from the checkpoint) its real value on ``device``, in place.

    Call while parameters are still meta or already loaded (not yet class-swapped); parameters
    and other buffers are never written. Returns the names filled by construction (step 2).
    """
    buffers = non_persistent_buffers(model, extra)
    attributes = tensor_attributes(model)
    if not buffers and not attributes:
        return []
    fresh: dict[int, torch.Tensor] = {}
    unchecked: list[str] = []
    for name, mod, attr in buffers:
        old = mod._buffers[attr]
        if id(old) not in fresh:
            new = torch.empty_like(old, device=device) if old.is_meta else old
            if old.is_meta and not _sentinel_fill(new):
                unchecked.append(name)
            fresh[id(old)] = new
        mod._buffers[attr] = fresh[id(old)]
    if hasattr(model, "initialize_weights"):
        for p in model.parameters():
            p._is_hf_initialized = True
        rebuilt = {id(t) for t in fresh.values()}
        for b in model.buffers():
            if id(b) not in rebuilt:
                b._is_hf_initialized = True
        with torch.no_grad():
            model.initialize_weights()
    todo = [(n, mod._buffers, attr, False) for n, mod, attr in buffers
            if n in unchecked or _still_sentinel(mod._buffers[attr])]
    todo += [(n, vars(mod), attr, True) for n, mod, attr in attributes]
    if not todo:
        return []
    if config is None:
        config = getattr(model, "config", None)
    built = constructed_buffers(config, model_class, dtype)
    done: dict[int, torch.Tensor] = {}
    filled = []
    for name, slots, attr, is_attr in todo:
        if name not in built and is_attr:
            # a plain attribute a forward pass created (the planner's probe runs one, e.g.
            # Phi-3's lazily cached long_inv_freq): a fresh model does not have it yet
            del slots[attr]
            continue
        if name not in built:
            raise CheckpointError(
                f"tensor {name} is in no checkpoint and could not be rebuilt: neither the "
                "model's constructor nor its _init_weights creates it; report this model type")
        key = id(slots[attr])
        if key not in done:
            done[key] = built[name].to(device=device, dtype=slots[attr].dtype)
        slots[attr] = done[key]
        filled.append(name)
    return filled
