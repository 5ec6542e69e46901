"""The shrinker: a tiny config of any model type from its default config, by attribute names
(and their ``attribute_map`` aliases), never by a per-model table."""

from __future__ import annotations

import pytest
import torch
import transformers

from xtp.models.shrink import HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, ShrinkError, tiny_config


def test_llama_gets_two_layers_four_heads_two_kv_heads():
    c = tiny_config("llama")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.vocab_size) == (LAYERS, HIDDEN, HEADS, KV_HEADS, 16, VOCAB)
    assert c.intermediate_size == 128 and c.max_position_embeddings == 64


def test_config_class_is_accepted_and_kv_heads_none_means_one_per_head():
    c = tiny_config(transformers.LlamaConfig, kv_heads=None)
    assert c.num_key_value_heads == c.num_attention_heads == HEADS


def test_aliases_are_followed_gpt2_and_t5():
    g = tiny_config("gpt2")
    assert (g.n_layer, g.n_embd, g.n_head, g.n_positions) == (LAYERS, HIDDEN, HEADS, 64)
    # token ids past the new vocabulary are folded into it (gpt2's are 50256)
    assert g.bos_token_id < VOCAB and g.eos_token_id < VOCAB
    t = tiny_config("t5")
    assert (t.num_layers, t.num_decoder_layers, t.d_model, t.num_heads, t.d_kv, t.d_ff) == (
        LAYERS, LAYERS, HIDDEN, HEADS, 16, 128)


def test_per_layer_lists_keep_one_layer_of_each_kind():
    default = transformers.CONFIG_MAPPING["qwen3_next"]()
    assert len(set(default.layer_types)) == 2 and len(default.layer_types) > LAYERS
    c = tiny_config("qwen3_next")
    assert c.num_hidden_layers == LAYERS
    assert sorted(c.layer_types) == sorted(set(default.layer_types))


def test_sub_configs_are_shrunk():
    c = tiny_config("gemma3")
    assert c.text_config.num_hidden_layers == LAYERS
    assert c.text_config.hidden_size == HIDDEN
    assert c.vision_config.num_hidden_layers == LAYERS


def test_sizes_are_only_made_smaller():
    # gpt_bigcode's default is multi-query: its single KV head is not raised to two
    c = tiny_config("mistral")
    assert c.num_key_value_heads == KV_HEADS
    small = tiny_config("gpt2")
    assert small.n_inner is None  # None (derived from n_embd) stays None


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert", "t5", "mixtral"])
def test_tiny_models_build_and_are_tiny(model_type):
    c = tiny_config(model_type)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(c)
    assert sum(p.numel() for p in model.parameters()) < 400_000


def test_unknown_type_is_a_one_line_shrink_error():
    with pytest.raises(ShrinkError, match=r"^no config class for 'not-a-model'") as info:
        tiny_config("not-a-model")
    assert "\n" not in str(info.value)


def test_a_config_that_rejects_tiny_sizes_says_so_in_one_line():
    # esmc validates that it has no grouped-query attention: 2 KV heads are rejected with the
    # config's own reason; one KV head per head (the sweep's second try) is accepted
    with pytest.raises(ShrinkError, match=r"^EsmcConfig rejects the tiny sizes: .*grouped-query"
                       ) as info:
        tiny_config("esmc")
    assert "\n" not in str(info.value)
    assert tiny_config("esmc", kv_heads=None).num_attention_heads == HEADS


def test_every_vocabulary_is_shrunk_not_only_vocab_size():
    c = tiny_config("roc_bert")  # word, shape and pronunciation vocabularies
    assert (c.vocab_size, c.shape_vocab_size, c.pronunciation_vocab_size) == (VOCAB,) * 3
    assert c.type_vocab_size == 2  # already small: kept


def test_sparse_attention_indexer_is_shrunk():
    """The indexer of sparse attention has its own heads: left at 64 x 128 it held most of a
    tiny model's weights (issue 17)."""
    if "deepseek_v32" not in transformers.CONFIG_MAPPING:
        pytest.skip("this transformers has no deepseek_v32")
    c = tiny_config("deepseek_v32", kv_heads=None)
    assert (c.index_n_heads, c.index_head_dim) == (HEADS, 32)


def test_sizes_named_after_what_they_belong_to_are_shrunk_by_pattern():
    # max_<what>_position_embeddings, <what>_embed_dim / _embedding_size, <what>_rank
    layout = tiny_config("layoutlm")
    assert layout.max_2d_position_embeddings == layout.max_position_embeddings == 64
    roc = tiny_config("roc_bert")
    assert (roc.pronunciation_embed_dim, roc.shape_embed_dim) == (HIDDEN, HIDDEN)
    rem = tiny_config("rembert")
    assert (rem.input_embedding_size, rem.output_embedding_size) == (HIDDEN, HIDDEN)
    assert tiny_config("zamba2").adapter_rank == 16


def test_a_head_family_shrinks_only_as_a_pair():
    # <p>_num_heads with <p>_head_dim: both shrink (mamba heads, their B/C groups follow)
    c = tiny_config("nemotron_h")
    assert (c.mamba_num_heads, c.mamba_head_dim, c.n_groups) == (HEADS, 16, KV_HEADS)
    assert c.moe_shared_expert_intermediate_size == 64  # an expert's FFN: half the dense one
    # qk_head_dim alone (no qk_num_heads) follows its nope and rope parts, not the pattern
    d = tiny_config("deepseek_v3", kv_heads=None)
    assert d.qk_head_dim == d.qk_nope_head_dim + d.qk_rope_head_dim


class _LayeredConfig(transformers.PretrainedConfig):
    """A config no transformers model has: per-layer kinds, a list of layer indices, and a
    4-long list that is neither (as long as the KV head count)."""

    model_type = "xtp_test_layered"

    def __init__(self, num_hidden_layers=12, hidden_size=256, num_attention_heads=8,
                 num_key_value_heads=4, block_kinds=None, global_layers=(3, 7, 11),
                 rope_section=(8, 8, 8, 8), **kwargs):
        self.num_hidden_layers, self.hidden_size = num_hidden_layers, hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.block_kinds = block_kinds or ["global" if i in global_layers else "local"
                                           for i in range(num_hidden_layers)]
        self.global_layers, self.rope_section = list(global_layers), list(rope_section)
        super().__init__(**kwargs)


def test_layer_index_lists_are_renumbered_to_the_layers_kept():
    c = tiny_config(_LayeredConfig)
    assert c.num_hidden_layers == LAYERS and c.block_kinds == ["local", "global"]  # layers 0, 3
    assert c.global_layers == [1]  # layer 3 is now layer 1; 7 and 11 are gone


def test_a_list_as_long_as_the_kv_head_count_is_no_per_layer_list():
    # the KV head count's tiny value (2) equals the layer count's: it was taken for a layer
    # count, and every 4-long list (here 4 KV heads) cut to two entries as if per layer
    assert tiny_config(_LayeredConfig).rope_section == [8, 8, 8, 8]
