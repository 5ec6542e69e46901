"""Rank-side code of the parity suite (runs inside RankPool ranks)."""

from __future__ import annotations

import torch

from parity_cases import CASES

STEPS = 16


def _build(case):
    import transformers

    torch.manual_seed(0)
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
