"""Two transformers written in plain PyTorch (no transformers, no ``config`` on the model), for
proving that xtp shards a model a user brings (issue 17).

* :class:`NanoGPT`: a nanoGPT-style GPT: one fused ``c_attn`` split by ``.split(self.n_embd)``,
  ``n_head`` and ``n_embd`` as attributes of the attention module, learned positions, GELU MLP,
  tied LM head.
* :class:`ScratchLlama`: a Llama written from scratch: separate q/k/v/o projections with
  grouped KV heads, rotary embeddings (rotate-half), RMSNorm, SwiGLU MLP.
* :class:`ScratchMoE`: the same attention in parallel with a mixture of experts whose experts
  are a ModuleList of Linear MLPs, plus a gated shared expert.
* :class:`ScratchSinks`: the Llama with per-head parameters (attention sinks, gate biases, a
  query bias per feature), a per-feature MLP scale and a per-vocabulary logit scale; its
  ``config`` holds only the vocabulary size.
* :class:`ScratchSharedLogits`: the Llama with no LM head module: its forward multiplies the
  hidden states by the input embedding's weight itself.

Head counts are held by the attention modules only; xtp reads them from the forward.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 101


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class GPTBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, n_embd: int = 48, n_head: int = 6, n_layer: int = 2,
                 block_size: int = 32) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([GPTBlock(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _rotate_half(x):
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-b, a), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, prescale_q: bool = False) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        # prescale_q: q is scaled before its view into heads, so the forward shows only the KV
        # heads' views (xtp then needs heads=/kv_heads=)
        self.q_scale = 1.0 if prescale_q else None
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x) if self.q_scale is None else self.wq(x) * self.q_scale
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = q.shape[1] // k.shape[1]  # local heads: no head count held by the module
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int,
                 prescale_q: bool = False) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(dim)
        self.attention = LlamaAttention(dim, n_heads, n_kv_heads, prescale_q)
        self.ffn_norm = RMSNorm(dim)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class ScratchLlama(nn.Module):
    def __init__(self, dim: int = 48, n_layers: int = 2, n_heads: int = 6, n_kv_heads: int = 2,
                 hidden: int = 88, prescale_q: bool = False) -> None:
        super().__init__()
        self.head_dim = dim // n_heads
        self.tok_embeddings = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList([LlamaBlock(dim, n_heads, n_kv_heads, hidden, prescale_q)
                                     for _ in range(n_layers)])
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        inv = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        freqs = torch.outer(torch.arange(T).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(input_ids.device), emb.sin().to(input_ids.device)
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h))


class Expert(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ListMoE(nn.Module):
    """Experts as a ModuleList of Linear MLPs (no fused 3-D experts), top-2 softmax routing
    computed densely (every expert on every token, weight 0 where not routed), and one shared
    expert with a sigmoid gate (as Qwen2-MoE's)."""

    def __init__(self, dim: int, hidden: int, n_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList([Expert(dim, hidden) for _ in range(n_experts)])
        self.shared_expert = Expert(dim, 2 * hidden)
        self.shared_gate = nn.Linear(dim, 1, bias=False)
        self.top_k = top_k

    def forward(self, x):
        probs = self.router(x).softmax(-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        out = torch.sigmoid(self.shared_gate(x)) * self.shared_expert(x)
        for e, expert in enumerate(self.experts):
            out = out + gates[..., e:e + 1] * expert(x)
        return out


class MoEBlock(LlamaBlock):
    """A Llama block whose MLP is a :class:`ListMoE`, run in parallel with the attention
    (GPT-J-style parallel residual: ``x + attn(norm(x)) + moe(norm(x))``)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int) -> None:
        super().__init__(dim, n_heads, n_kv_heads, hidden)
        del self.w1, self.w2, self.w3, self.ffn_norm
        self.moe = ListMoE(dim, hidden)

    def forward(self, x, cos, sin):
        h = self.attention_norm(x)
        return x + self.attention(h, cos, sin) + self.moe(h)


class ScratchMoE(ScratchLlama):
    """:class:`ScratchLlama` with :class:`MoEBlock` layers."""

    def __init__(self, dim: int = 48, n_layers: int = 2, n_heads: int = 6, n_kv_heads: int = 2,
                 hidden: int = 40) -> None:
        super().__init__(dim, n_layers, n_heads, n_kv_heads, hidden)
        self.layers = nn.ModuleList([MoEBlock(dim, n_heads, n_kv_heads, hidden)
                                     for _ in range(n_layers)])


class SinkAttention(LlamaAttention):
    """Per-head parameters its forward applies to its own heads: a bias per query feature, an
    attention sink logit per head (a softmax column dropped after), a gate bias per head."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__(dim, n_heads, n_kv_heads)
        self.q_bias = nn.Parameter(torch.randn(n_heads * self.head_dim))
        self.sinks = nn.Parameter(torch.randn(n_heads))
        self.gate_bias = nn.Parameter(torch.randn(n_heads))

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim) + self.q_bias.view(-1, self.head_dim)
        q = q.transpose(1, 2)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(B, -1, T, 1)
        probs = torch.cat([scores, sinks], dim=-1).softmax(-1)[..., :-1]
        y = (probs @ v) * torch.sigmoid(self.gate_bias).view(1, -1, 1, 1)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class ScaledHead(nn.Linear):
    """An LM head with a learned scale per output (vocabulary) feature."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, VOCAB, bias=False)
        self.logit_scale = nn.Parameter(torch.rand(VOCAB) + 0.5)

    def forward(self, x):
        return super().forward(x) * self.logit_scale


class SinkBlock(LlamaBlock):
    """LlamaBlock with :class:`SinkAttention` and a learned scale per MLP feature."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int) -> None:
        super().__init__(dim, n_heads, n_kv_heads, hidden)
        self.attention = SinkAttention(dim, n_heads, n_kv_heads)
        self.w1_scale = nn.Parameter(torch.rand(hidden) + 0.5)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h) * self.w1_scale) * self.w3(h))


class ScratchSinks(ScratchLlama):
    """Attention sinks, per-head gate biases, a per-feature query bias, a per-feature MLP
    scale and a per-vocabulary logit scale: each split with the heads or features it scales."""

    def __init__(self, dim: int = 48, n_layers: int = 2, n_heads: int = 6, n_kv_heads: int = 2,
                 hidden: int = 88) -> None:
        super().__init__(dim, n_layers, n_heads, n_kv_heads, hidden)
        self.layers = nn.ModuleList([SinkBlock(dim, n_heads, n_kv_heads, hidden)
                                     for _ in range(n_layers)])
        self.output = ScaledHead(dim)
        self.config = SimpleNamespace(vocab_size=VOCAB)  # only the vocabulary: heads inferred


class ScratchSharedLogits(ScratchLlama):
    """Logits from the embedding's weight used directly in the forward (no LM head module)."""

    def __init__(self) -> None:
        super().__init__()
        del self.output
        self.config = SimpleNamespace(vocab_size=VOCAB)  # the vocabulary: the embedding splits

    def forward(self, input_ids):
        h = self.tok_embeddings(input_ids)
        T = input_ids.shape[1]
        inv = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        emb = torch.cat([torch.outer(torch.arange(T).float(), inv)] * 2, dim=-1)
        for layer in self.layers:
            h = layer(h, emb.cos(), emb.sin())
        return torch.einsum("btd,vd->btv", self.norm(h), self.tok_embeddings.weight)


BUILDERS = {
    "nanogpt": NanoGPT,
    "scratch_llama": ScratchLlama,
    "scratch_llama_prescaled": lambda: ScratchLlama(prescale_q=True),
    "scratch_moe": ScratchMoE,
    "scratch_sinks": ScratchSinks,
    "scratch_shared_logits": ScratchSharedLogits,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """A seeded model by name (a key of :data:`BUILDERS`), in eval mode."""
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()
