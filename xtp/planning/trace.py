"""Running the data-flow probe (:mod:`xtp.planning.probe`) on a model without changing it.

Step 1 of planning: one forward on fake tensors tells which Linear outputs reach which Linear
inputs. The model's training mode, buffers and tensor attributes are restored afterwards.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from ..errors import PlanError
from .model_table import CONFIG_ALIASES
from .probe import FlowGraph, probe
from .traced import instrument_config, instrument_modules, restore, untrace_modules
from .weights import weight_kind

#: config attributes that may hold a head count (traced during the probe)
HEAD_COUNT_NAMES = CONFIG_ALIASES["num_heads"] + CONFIG_ALIASES["num_kv_heads"]


def _probe_inputs(model: nn.Module, device: torch.device, batch: int = 1, tokens: int = 4
                  ) -> dict:
    """Keyword inputs for one forward on ``batch`` sequences of ``tokens`` tokens (decoder ids
    too for encoder-decoders)."""
    ids = torch.zeros((batch, tokens), dtype=torch.long, device=device)
    inputs = {"input_ids": ids}
    config = getattr(model, "config", None)
    params = inspect.signature(model.forward).parameters
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = ids.clone()
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


def _snapshot_tensor_state(model: nn.Module) -> list:
    """Every module's buffers and plain tensor attributes (a forward may replace them, e.g.
    rotary embeddings that switch frequency tables by sequence length)."""
    return [(m, dict(m._buffers),
             {k: v for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)})
            for m in model.modules()]


def _restore_tensor_state(state: list) -> None:
    for m, buffers, attrs in state:
        m._buffers.clear()
        m._buffers.update(buffers)
        for k in [k for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)]:
            if k not in attrs:
                del m.__dict__[k]
        m.__dict__.update(attrs)


def _probe_once(model: nn.Module, fake: bool, inputs=_probe_inputs) -> FlowGraph:
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    is_source = lambda m: weight_kind(m) is not None  # noqa: E731
    if not fake:
        return probe(model, inputs(model, device), is_source)
    if device.type == "meta":
        # meta kernels lack a few ops models use (autocast, data-dependent checks): probe a
        # copy whose parameters are fake CPU tensors instead (no memory either way)
        model = copy.deepcopy(model)
        device = torch.device("cpu")
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device=device)
            return probe(model, inputs(model, device), is_source)
    with FakeTensorMode(allow_non_fake_inputs=True):
        return probe(model, inputs(model, device), is_source)


def _probe_fake_then_real(model: nn.Module, state: list, inputs=_probe_inputs) -> FlowGraph:
    """Probe on fake tensors; if that fails and the weights are real, once for real."""
    try:
        return _probe_once(model, fake=True, inputs=inputs)
    except Exception as fake_exc:
        _restore_tensor_state(state)
        if any(p.is_meta for p in model.parameters()):
            raise PlanError(
                f"the structure probe (one forward pass of {type(model).__name__} on fake "
                f"tensors) failed: {type(fake_exc).__name__}: {fake_exc}. Shard a model "
                "with real weights instead (xtp.shard after loading it), or report this "
                "model type"
            ) from fake_exc
        try:
            with torch.no_grad():
                return _probe_once(model, fake=False, inputs=inputs)
        except Exception as exc:
            raise PlanError(
                f"the structure probe (one forward pass of {type(model).__name__} on 4 "
                f"tokens) failed: {type(exc).__name__}: {exc}. xtp needs the model's "
                "forward to run on input_ids alone; pass a model that does, or report "
                "this model type"
            ) from exc


def _eager_attention(model: nn.Module) -> list:
    """Switch every config the model's modules hold to transformers' eager attention for the
    probe (the path that spells out every head reshape and the KV repeat, which fused kernels
    such as SDPA may skip: what the probe does not see cannot be made local); returns what
    :func:`_restore_attention` needs."""
    saved, seen = [], set()
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is None or id(config) in seen:
            continue
        seen.add(id(config))
        impl = getattr(config, "__dict__", {}).get("_attn_implementation_internal")
        if isinstance(impl, str) and impl != "eager":
            saved.append((config, impl))
            config.__dict__["_attn_implementation_internal"] = "eager"
    return saved


def _restore_attention(saved: list) -> None:
    for config, impl in saved:
        config.__dict__["_attn_implementation_internal"] = impl


def run_probe(model: nn.Module, inputs=_probe_inputs) -> FlowGraph:
    """Trace ``model``'s data flow with one forward pass on 4 tokens (or on what
    ``inputs(model, device) -> dict`` builds: a tower's own input, :mod:`xtp.planning.towers`).

    First on fake tensors (no compute, no memory; a meta model is probed through a fake-CPU
    copy). If the forward cannot run on fake tensors (data-dependent code such as dynamic
    RoPE) and the model holds real weights, the probe runs for real on its device: one small
    forward, nothing kept. The model's training mode, buffers and tensor attributes are
    restored afterwards. A forward that replaces some of the model's modules (transformers
    switches an attention type for a short input) is probed once more as it is then. The
    probe runs transformers' eager attention (:func:`_eager_attention`); a model that cannot
    switch after it was built (parts of it chose their path at construction) is probed as it is.

    Raises:
        PlanError: the forward pass cannot run (on fake tensors for a meta model).
    """
    try:
        return _run_probe(model, inputs, eager=True)
    except PlanError:
        return _run_probe(model, inputs, eager=False)


def _run_probe(model: nn.Module, inputs, eager: bool) -> FlowGraph:
    was_training = model.training
    model.eval()
    config = getattr(model, "config", None)
    experts_impl = getattr(config, "_experts_implementation_internal", None)
    # the gather-based experts kernel runs on fake tensors (eager: nonzero; grouped_mm: bf16)
    if experts_impl is not None:
        config._experts_implementation_internal = "batched_mm"
    state = _snapshot_tensor_state(model)
    attention = _eager_attention(model) if eager else []
    traced: list = []
    try:
        before = [id(m) for m in model.modules()]
        for _ in range(2):
            traced = instrument_config(config, HEAD_COUNT_NAMES) + instrument_modules(
                model, lambda m: weight_kind(m) is not None)
            graph = _probe_fake_then_real(model, state, inputs)
            if [id(m) for m in model.modules()] == before:
                return graph
            # the forward rebuilt some of its modules (an attention type switched for a short
            # input): their ints were not traced; probe the model as it is now, once more
            restore(traced)
            untrace_modules(model)
            traced, before = [], [id(m) for m in model.modules()]
            state = _snapshot_tensor_state(model)
        return graph
    finally:
        restore(traced)
        untrace_modules(model)
        _restore_attention(attention)
        _restore_tensor_state(state)
        model.train(was_training)
        if experts_impl is not None:
            config._experts_implementation_internal = experts_impl


def run_wide_probe(model: nn.Module, batch: int, tokens: int) -> FlowGraph:
    """:func:`run_probe` on ``batch`` sequences of ``tokens`` tokens: sizes that one sequence of
    4 tokens leaves ambiguous (is a dimension of 4 the heads or the tokens?) are told apart."""
    return run_probe(model, lambda m, device: _probe_inputs(m, device, batch, tokens))
