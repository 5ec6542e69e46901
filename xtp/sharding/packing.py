"""Inference packing: the sharded linear weights stored in the accelerator's fastest layout.

:func:`pack_for_inference` asks the model's accelerator (:meth:`Accelerator.pack_linear_weight`)
to repack every weight of an xtp column, row and lm_head layer that is a plain ``nn.Linear``;
on CPU, :mod:`xtp.accelerators.cpu.packed_linear` says which layout each dtype gets (xtp's
GEMV kernel, :mod:`xtp.accelerators.cpu.gemv`, or oneDNN's blocked layout; measured gains in
bench/RESULTS.md); elsewhere nothing changes. Each packed weight replaces the dense one (no
second copy: at most one weight exists twice, while it is being packed); the module keeps a
zero-stride placeholder ``weight`` of the right shape, dtype and device, so code that inspects
it still works, and ``state_dict()`` still returns the real values (unpacked on the fly).

Packed weights have no backward, so packing is for inference: it turns ``requires_grad`` off on
every parameter of the model (restored by :func:`unpack`), and a forward whose input needs a
gradient raises :class:`PackedWeightsError`. Operations that write or move weights
(``xtp.save_sharded``, training checkpoints) raise it too; :func:`unpack` restores the dense
weights bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from ..accelerators.packed.compiled import handle as op_handle
from ..accelerators.packed.compiled import packed_linear
from ..errors import PackedWeightsError, XtpError
from ..planning.spec import Role, WeightKind
from .state import (
    PACKED_ATTR,
    PACKED_GRAD_FLAGS_ATTR,
    PACKED_HOOKS_ATTR,
    PACKED_ROOT_HOOK_ATTR,
    sharded_context,
)

PACKABLE_ROLES = (Role.COLUMN, Role.ROW, Role.LM_HEAD)


def _hint(what: str) -> str:
    return (f"{what} needs the dense weights, but this model's linear weights are packed for "
            "inference (xtp.pack_for_inference, or `xtp run`/`bench` without --no-pack); "
            "call xtp.unpack(model) first")


def is_packed(model: nn.Module) -> bool:
    """Whether any module of ``model`` holds a packed weight."""
    return any(PACKED_ATTR in m.__dict__ for m in model.modules())


def require_dense(model: nn.Module, what: str) -> None:
    """Raise :class:`PackedWeightsError` naming ``what`` when ``model`` is packed."""
    if is_packed(model):
        raise PackedWeightsError(_hint(what))


def _packable(module: nn.Module) -> bool:
    """An xtp-sharded plain ``nn.Linear`` (its original class computes ``F.linear``)."""
    original = getattr(module, "tp_original_class", None)
    return (isinstance(module, nn.Linear) and getattr(module, "tp_role", "") in PACKABLE_ROLES
            and getattr(module, "tp_kind", WeightKind.OUT_IN) == WeightKind.OUT_IN
            and original is not None
            and original.forward is nn.Linear.forward and PACKED_ATTR not in module.__dict__)


def _dense_state_hook(module, state_dict, prefix, local_metadata) -> None:
    packed = module.__dict__.get(PACKED_ATTR)
    if packed is not None and prefix + "weight" in state_dict:
        state_dict[prefix + "weight"] = packed.unpack()


def _refuse_load(module, state_dict, prefix, *args) -> None:
    raise PackedWeightsError(_hint("load_state_dict"))


def pack_for_inference(model: nn.Module, accelerator=None) -> int:
    """Pack the sharded linear weights of ``model`` (from :func:`xtp.shard` or
    :func:`xtp.from_pretrained`) for fast inference; returns how many were packed (0 where the
    accelerator keeps weights dense, e.g. GPUs, fp32 on CPU without the GEMV kernel, or
    ``XTP_CPU_PACK=0``, and at tp 1, where no layer is sharded). ``accelerator`` defaults to
    the one the model was sharded with; a model xtp did not shard (and no ``accelerator``)
    raises :class:`~xtp.errors.XtpError`.

    Turns ``requires_grad`` off on every parameter (restored by :func:`unpack`). Calling it
    again packs nothing more. ``load_state_dict`` on a packed module raises
    :class:`~xtp.errors.PackedWeightsError`.
    """
    if accelerator is None:
        ctx = sharded_context(model)
        if ctx is None:
            raise XtpError("pack_for_inference needs a model sharded by xtp.shard() or loaded "
                           "by xtp.from_pretrained()")
        accelerator = ctx.accelerator
    flags = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
    uses: dict[int, int] = {}  # a weight tied to another module (an embedding) stays dense
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    count = 0
    for module in model.modules():
        if not _packable(module) or uses.get(id(module.weight), 0) > 1:
            continue
        weight = module.weight
        packed = accelerator.pack_linear_weight(weight.detach())
        if packed is None:
            continue
        op_handle(packed)  # named for torch.compile's packed-matmul op before any tracing
        placeholder = torch.zeros((), dtype=weight.dtype, device=weight.device)
        module.__dict__[PACKED_ATTR] = packed
        module.__dict__[PACKED_HOOKS_ATTR] = (module._register_state_dict_hook(_dense_state_hook),
                                       module.register_load_state_dict_pre_hook(_refuse_load))
        module.weight = nn.Parameter(placeholder.expand(weight.shape), requires_grad=False)
        del weight  # the dense weight is freed here unless the caller holds it
        count += 1
    if count and PACKED_GRAD_FLAGS_ATTR not in model.__dict__:
        model.__dict__[PACKED_GRAD_FLAGS_ATTR] = flags
        model.requires_grad_(False)
        # on the root too: it runs before any submodule is loaded, so nothing changes
        root_hook = model.register_load_state_dict_pre_hook(_refuse_load)
        model.__dict__[PACKED_ROOT_HOOK_ATTR] = root_hook
    return count


def unpack(model: nn.Module) -> int:
    """Undo :func:`pack_for_inference`: dense weights (bit for bit) and the ``requires_grad``
    flags as they were. Returns how many weights were unpacked."""
    count = 0
    for module in model.modules():
        packed = module.__dict__.pop(PACKED_ATTR, None)
        if packed is None:
            continue
        for handle in module.__dict__.pop(PACKED_HOOKS_ATTR):
            handle.remove()
        module.weight = nn.Parameter(packed.unpack(), requires_grad=False)
        count += 1
    root_hook = model.__dict__.pop(PACKED_ROOT_HOOK_ATTR, None)
    if root_hook is not None:
        root_hook.remove()
    flags = model.__dict__.pop(PACKED_GRAD_FLAGS_ATTR, None)
    if flags is not None:
        for name, p in model.named_parameters(remove_duplicate=False):
            p.requires_grad_(flags.get(name, p.requires_grad))
    return count


def packed_matmul(module: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor | None:
    """``x @ W.T (+ bias)`` through the module's packed weight, or ``None`` when it has none.
    Shapes: ``x`` ``(..., in_features)`` -> ``(..., out_features)``."""
    packed = module.__dict__.get(PACKED_ATTR)
    if packed is None:
        return None
    if x.requires_grad and torch.is_grad_enabled():
        raise PackedWeightsError(_hint("a forward that needs gradients"))
    return packed_linear(packed, x, bias)
