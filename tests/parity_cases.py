"""Tiny random configs for the parity suite, one per architecture case.

Each case builds a transformers config (no download) with head counts that make tp 2, 3 and 4
meaningful where the architecture allows. ``tps`` lists the TP sizes the case runs at.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    id: str
    model_type: str
    kwargs: dict
    tps: tuple[int, ...] = (2, 3, 4)
    kind: str = "causal"  # causal | encoder | seq2seq
    extra: dict = field(default_factory=dict)

    def config(self):
        import transformers

        return transformers.CONFIG_MAPPING[self.model_type](**self.kwargs)


_LLAMA = dict(hidden_size=96, intermediate_size=120, num_hidden_layers=2, vocab_size=101,
              max_position_embeddings=64)

CASES: list[Case] = [
    Case("llama", "llama", dict(_LLAMA, num_attention_heads=12, num_key_value_heads=12)),
    Case("llama_kv2_tp4", "llama", dict(_LLAMA, num_attention_heads=8, num_key_value_heads=2,
                                       hidden_size=64), tps=(2, 4)),
    Case("llama_kv1", "llama", dict(_LLAMA, num_attention_heads=12, num_key_value_heads=1)),
    Case("llama_6heads_tp4", "llama", dict(_LLAMA, num_attention_heads=6, num_key_value_heads=6),
         tps=(4,)),
]
