"""Tiny random configs for the parity suite, one per architecture case.

Each case builds a transformers config (no download) with head counts that make tp 2, 3 and 4
meaningful where the architecture allows. ``tps`` lists the TP sizes the case runs at.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    id: str
    model_type: str
    kwargs: dict
    tps: tuple[int, ...] = (2, 3, 4)
    kind: str = "causal"  # causal | encoder | seq2seq

    def config(self):
        import transformers

        return transformers.CONFIG_MAPPING[self.model_type](**self.kwargs)


V = 101  # a vocabulary that divides by neither 2, 3 nor 4
_DEC = dict(hidden_size=96, intermediate_size=120, num_hidden_layers=2, vocab_size=V,
            max_position_embeddings=64)
_GQA = dict(_DEC, num_attention_heads=12, num_key_value_heads=6)
_MHA = dict(_DEC, num_attention_heads=12, num_key_value_heads=12)
_KV2 = dict(_DEC, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)

_MLA = dict(_DEC, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
            kv_lora_rank=20, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
            moe_intermediate_size=32, first_k_dense_replace=1)

CASES: list[Case] = [
    Case("llama", "llama", _MHA),
    Case("llama_kv2_tp4", "llama", dict(_DEC, hidden_size=64, num_attention_heads=8,
                                       num_key_value_heads=2), tps=(2, 4)),
    Case("llama_kv1", "llama", dict(_DEC, num_attention_heads=12, num_key_value_heads=1)),
    Case("llama_6heads_tp4", "llama", dict(_DEC, num_attention_heads=6, num_key_value_heads=6),
         tps=(4,)),
    Case("mistral", "mistral", _GQA),
    # 2 KV heads at tp 3 (refused before issue 17): KV head 0 on ranks 0 and 1, head 1 on rank 2
    Case("llama_kv2_tp3", "llama", _KV2, tps=(3,)),
    Case("mistral_kv2_tp3", "mistral", _KV2, tps=(3,)),
    Case("qwen2_kv2_tp3", "qwen2", _KV2, tps=(3,)),
    Case("phi3_kv2_tp3", "phi3", dict(_KV2, pad_token_id=0), tps=(3,)),
    Case("falcon_kv2_tp3", "falcon", dict(hidden_size=64, num_attention_heads=4,
                                          num_hidden_layers=1, vocab_size=V,
                                          new_decoder_architecture=True, num_kv_heads=2,
                                          alibi=False), tps=(3,)),
    Case("qwen2", "qwen2", _GQA),
    Case("qwen3", "qwen3", dict(_GQA, head_dim=8)),
    Case("gemma", "gemma", dict(_GQA, head_dim=8)),
    Case("gemma2", "gemma2", dict(_GQA, head_dim=8)),
    Case("phi", "phi", dict(_MHA)),
    Case("phi3", "phi3", dict(_GQA, pad_token_id=0)),
    Case("gpt_neox", "gpt_neox", dict(_DEC, num_attention_heads=12)),
    Case("gptj", "gptj", dict(n_embd=96, n_head=12, n_layer=2, vocab_size=V, n_positions=64,
                              rotary_dim=4)),
    # fused qkv in mp_num=4 groups of [q | v | k], viewed by embed_dim // mp_num: embed_dim is
    # divided, so it keeps its full value (was silently wrong when made local)
    Case("codegen", "codegen", dict(n_embd=64, n_head=4, n_layer=2, vocab_size=V,
                                    n_positions=64, rotary_dim=8)),
    Case("gpt2", "gpt2", dict(n_embd=96, n_head=12, n_layer=2, vocab_size=V, n_positions=64)),
    Case("gpt_bigcode", "gpt_bigcode", dict(n_embd=96, n_head=12, n_layer=2, vocab_size=V,
                                            n_positions=64, multi_query=True)),
    Case("gpt_bigcode_mha", "gpt_bigcode", dict(n_embd=96, n_head=12, n_layer=2, vocab_size=V,
                                                n_positions=64, multi_query=False)),
    Case("opt", "opt", dict(hidden_size=96, ffn_dim=120, num_attention_heads=12,
                            num_hidden_layers=2, vocab_size=V, max_position_embeddings=64,
                            word_embed_proj_dim=96, pad_token_id=0)),
    Case("bloom", "bloom", dict(hidden_size=96, n_head=12, n_layer=2, vocab_size=V)),
    Case("falcon", "falcon", dict(hidden_size=96, num_attention_heads=12, num_hidden_layers=2,
                                  vocab_size=V, new_decoder_architecture=True,
                                  num_kv_heads=6, alibi=False)),
    Case("falcon_mqa", "falcon", dict(hidden_size=96, num_attention_heads=12,
                                      num_hidden_layers=2, vocab_size=V, multi_query=True,
                                      new_decoder_architecture=False, alibi=False,
                                      parallel_attn=True)),
    Case("falcon_alibi", "falcon", dict(hidden_size=96, num_attention_heads=12,
                                        num_hidden_layers=2, vocab_size=V, alibi=True,
                                        new_decoder_architecture=False, multi_query=False,
                                        parallel_attn=True)),
    Case("starcoder2", "starcoder2", _GQA),
    Case("olmo2", "olmo2", _GQA),
    Case("granite", "granite", _GQA),
    Case("cohere", "cohere", _GQA),
    Case("stablelm", "stablelm", dict(_GQA)),
    Case("mixtral", "mixtral", dict(_GQA, num_local_experts=4, num_experts_per_tok=2)),
    Case("qwen2_moe", "qwen2_moe", dict(_GQA, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=64,
                                        shared_expert_intermediate_size=120)),
    # multi-head latent attention: q_b_proj / kv_b_proj / o_proj split by heads (each its own
    # head width: 12, 16 and 8), the low-rank q_a_proj / kv_a_proj_with_mqa replicated
    Case("deepseek_v2", "deepseek_v2", _MLA),
    Case("deepseek_v3_no_q_lora", "deepseek_v3", dict(_MLA, q_lora_rank=None, n_group=2,
                                                      topk_group=1), tps=(3,)),
    Case("bert", "bert", dict(hidden_size=96, intermediate_size=120, num_attention_heads=12,
                              num_hidden_layers=2, vocab_size=V, max_position_embeddings=64),
         kind="encoder"),
    Case("roberta", "roberta", dict(hidden_size=96, intermediate_size=120,
                                    num_attention_heads=12, num_hidden_layers=2, vocab_size=V,
                                    max_position_embeddings=64, pad_token_id=1),
         kind="encoder"),
    # reshapes its attention output to a width read off its input: sharded padded (uneven heads)
    Case("trocr_padded_tp3", "trocr", dict(d_model=64, decoder_attention_heads=4,
                                           decoder_ffn_dim=120, decoder_layers=2, vocab_size=V,
                                           max_position_embeddings=64), tps=(3,)),
    Case("t5", "t5", dict(d_model=96, d_kv=8, d_ff=120, num_heads=12, num_layers=2,
                          num_decoder_layers=2, vocab_size=V, decoder_start_token_id=0),
         kind="seq2seq"),
]
