"""Rank-side code of the parity suite (runs inside RankPool ranks)."""

from __future__ import annotations

import torch

from parity_cases import CASES

STEPS = 16


def _build(case, seed: int = 0):
    """The model of ``case`` with weights seeded by ``seed``, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = case.config()
    if case.kind == "causal":
        model = transformers.AutoModelForCausalLM.from_config(config)
    elif case.kind == "seq2seq":
        model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    else:
        model = transformers.AutoModel.from_config(config)
    model.eval()
    return model


def _inputs(config, kind):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, 7), generator=g)
    return ids


def parity(case_id: str, tp: int) -> dict:
    """Compare the tp-sharded model with the unsharded one on this rank; returns metrics."""
    import xtp
    from xtp.accelerators import CountingCommunicator

    case = next(c for c in CASES if c.id == case_id)
    ref = _build(case)
    model = _build(case)
    ids = _inputs(model.config, case.kind)
    counter = {}

    def wrap(comm):
        counter["c"] = CountingCommunicator(comm)
        return counter["c"]

    xtp.shard(model, tp_size=tp, communicator=wrap)
    out: dict = {}
    with torch.no_grad():
        if case.kind == "causal":
            want = ref(ids).logits
            counter["c"].clear()
            got = model(ids).logits
            out["counts"] = dict(counter["c"].counts())
            out["plan_counts"] = dict(model._xtp_plan.collective_counts())
            gen_ref = ref.generate(ids[:1], max_new_tokens=STEPS, do_sample=False,
                                   pad_token_id=0)
            gen = model.generate(ids[:1], max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
            out["tokens_equal"] = bool(torch.equal(gen_ref, gen))
        elif case.kind == "seq2seq":
            dec = ids[:, :3]
            want = ref(input_ids=ids, decoder_input_ids=dec).logits
            got = model(input_ids=ids, decoder_input_ids=dec).logits
            gen_ref = ref.generate(ids[:1], max_new_tokens=STEPS, do_sample=False)
            gen = model.generate(ids[:1], max_new_tokens=STEPS, do_sample=False)
            out["tokens_equal"] = bool(torch.equal(gen_ref, gen))
        else:
            want = ref(ids).last_hidden_state
            got = model(ids).last_hidden_state
            out["tokens_equal"] = True
    out["rel_err"] = float((got - want).norm() / want.norm())
    out["layers"] = getattr(model.config, "num_hidden_layers", None)
    return out


def packed_parity(case_id: str, tp: int, dtype_name: str = "float32",
                  layouts: str = "onednn") -> dict:
    """Shard, then pack for inference (every weight, however small; ``layouts="onednn"``: in
    oneDNN's layout for every dtype, fp32 too; ``"default"``: the default layouts, i.e. fp32
    through xtp's GEMV kernel, counted in ``gemv_calls``, with one thread per rank as the
    kernel needs) and compare: with the
    unsharded model, with the dense sharded model, state_dict and unpack bit for bit, and the
    typed errors of operations that need dense weights."""
    import os
    import tempfile

    import xtp
    from gemv_spy import install_gemv_spy
    from xtp.accelerators.cpu.packed_linear import PACKABLE_DTYPES
    from xtp.accelerators.devices.cpu import CpuAccelerator
    from xtp.errors import PackedWeightsError

    spy = None
    if layouts == "default":
        torch.set_num_threads(1)
        spy = install_gemv_spy()
    dtype = getattr(torch, dtype_name)
    case = next(c for c in CASES if c.id == case_id)
    ref = _build(case).to(dtype)
    model = _build(case).to(dtype)
    ids = _inputs(model.config, case.kind)
    xtp.shard(model, tp_size=tp)

    def forward(m):
        if case.kind == "seq2seq":
            return m(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        out = m(ids)
        return out.logits if case.kind == "causal" else out.last_hidden_state

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want, dense = forward(ref), forward(model)
    cpu = CpuAccelerator(pack_min_bytes=0,
                         pack_dtypes=PACKABLE_DTYPES if layouts == "onednn" else None)
    out: dict = {"packed": xtp.pack_for_inference(model, cpu)}
    out["packed_again"] = xtp.pack_for_inference(model, cpu)
    out["grad_off"] = not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        got = forward(model)
        if case.kind != "encoder":
            kw = dict(max_new_tokens=STEPS, do_sample=False, pad_token_id=0)
            out["tokens_equal"] = bool(torch.equal(ref.generate(ids[:1], **kw),
                                                   model.generate(ids[:1], **kw)))
    out["rel_err"] = float((got.float() - want.float()).norm() / want.float().norm())
    out["rel_err_vs_dense"] = float((got.float() - dense.float()).norm() / dense.float().norm())
    state = model.state_dict()
    out["state_equal"] = sorted(k for k in dense_state if not torch.equal(state[k], dense_state[k]))
    out["save_error"], out["save_left_nothing"] = None, True
    with tempfile.TemporaryDirectory() as tmp:  # each rank its own folder: only the error
        target = os.path.join(tmp, "out")       # path can be tested this way
        if not out["packed"]:
            target = None
        try:
            if target is not None:
                xtp.save_sharded(model, target)
        except PackedWeightsError as exc:
            out["save_error"] = str(exc)
        out["save_left_nothing"] = not os.listdir(tmp)
    other = {k: v + 1 if v.is_floating_point() else v for k, v in dense_state.items()}
    try:
        model.load_state_dict(other)
        out["load_error"] = None
    except PackedWeightsError as exc:
        out["load_error"] = str(exc)
    state = model.state_dict()
    out["state_after_failed_load"] = sorted(
        k for k in dense_state if not torch.equal(state[k], dense_state[k]))
    if out["load_error"] is None:  # nothing packed: the load went through; undo it
        model.load_state_dict(dense_state)
    model.train()
    try:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        if case.kind == "seq2seq":
            model(inputs_embeds=emb, decoder_input_ids=ids[:, :3])
        else:
            model(inputs_embeds=emb)
        out["grad_error"] = None
    except PackedWeightsError as exc:
        out["grad_error"] = str(exc)
    model.eval()
    out["unpacked"] = xtp.unpack(model)
    state = model.state_dict()
    out["unpacked_state_equal"] = sorted(
        k for k in dense_state if not torch.equal(state[k], dense_state[k]))
    out["flags_restored"] = flags == {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        out["unpacked_equal_dense"] = bool(torch.equal(forward(model), dense))
    out["gemv_calls"] = spy.calls if spy is not None else 0
    return out


def scratch_parity(name: str, tp: int, heads: int | None = None,
                   kv_heads: int | None = None) -> dict:
    """A plain PyTorch model of tests/helpers/scratch_models.py sharded over the real group vs
    unsharded: relative error of the logits, greedy next tokens, and this rank's weight share."""
    import scratch_models
    import xtp

    ref = scratch_models.build(name)
    model = scratch_models.build(name)
    ids = torch.randint(0, scratch_models.VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    full = sum(p.numel() for p in ref.parameters())
    xtp.shard(model, tp_size=tp, heads=heads, kv_heads=kv_heads)
    with torch.no_grad():
        want, got = ref(ids), model(ids)
    return {"rel_err": float((got - want).norm() / want.norm()),
            "tokens_equal": bool(torch.equal(got.argmax(-1), want.argmax(-1))),
            "share": sum(p.numel() for p in model.parameters()) / full}
