"""Config attributes a heterogeneous config refuses to give globally (transformers raises when a
per-layer value such as ``head_dim`` is read from the whole-model config): xtp treats them as
absent and takes the head sizes from the forward instead of failing (issue 17).

Tier: config reads (no model), one plan and one in-process thread-rank parity check of a tiny
gemma4_text (two head sizes, one per layer kind).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import xtp
from thread_ranks import rel_err, run_sharded
from xtp.models.shrink import tiny_config
from xtp.planning import model_table as mt


class _PerLayerConfig:
    """A config whose ``head_dim`` varies per layer: reading it globally raises."""

    num_attention_heads = 4
    num_key_value_heads = 2
    hidden_size = 64

    @property
    def head_dim(self):
        raise RuntimeError("'head_dim' is a per-layer attribute")


def test_per_layer_attribute_reads_as_absent():
    assert mt.config_value(_PerLayerConfig(), "head_dim") is None
    assert mt.config_value(_PerLayerConfig(), "num_heads") == 4


def test_per_layer_head_dim_gives_no_config_head_shape():
    # not hidden // heads: that guess would be wrong for some layers
    assert mt.head_shape(_PerLayerConfig()) is None


def _gemma4_text():
    if "gemma4_text" not in transformers.CONFIG_MAPPING:
        pytest.skip("this transformers has no gemma4_text")
    torch.manual_seed(0)
    config = tiny_config("gemma4_text")
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()


@pytest.mark.parametrize("tp", [2, 3])
def test_per_layer_head_sizes_shard_with_parity(tp):
    model = _gemma4_text()
    plan = xtp.plan(model, tp)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert max(plan.bytes_per_rank(r) for r in range(tp)) <= 0.8 * full
    ids = torch.randint(0, model.config.vocab_size, (1, 6),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        outs = run_sharded(model, tp, lambda m: m(ids, use_cache=False).logits, plan=plan)
    assert max(rel_err(o, want) for o in outs) <= 1e-5


def test_vocab_size_of_a_multimodal_config_from_its_text_config():
    if "gemma3" not in transformers.CONFIG_MAPPING:
        pytest.skip("this transformers has no gemma3")
    config = tiny_config("gemma3")
    assert getattr(config, "vocab_size", None) is None  # only the text sub-config has one
    assert mt.vocab_size(config) == config.get_text_config().vocab_size
    assert mt.config_value(config, "vocab_size") == config.get_text_config().vocab_size
    model = transformers.Gemma3ForConditionalGeneration(config)
    roles = {s.name: s.role.value for s in xtp.plan(model, 2).specs}
    assert roles["model.language_model.embed_tokens"] == "vocab_embedding"
    assert roles["lm_head"] == "lm_head"
