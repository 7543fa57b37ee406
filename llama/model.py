"""The Llama 2 / Llama 3.x transformer, with Meta's semantics and a static KV cache.

The model knows nothing about parallelism: `llama.parallel` shards its linear layers and
tells each attention module how many heads it holds locally. Parameter names match the
keys of Meta's checkpoints, so a state dict maps one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llama.args import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Per-position rotation angles, shape (max_seq_len, head_dim // 2), float32."""
    dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    if args.use_scaled_rope:
        freqs = _scale_llama31(freqs, args.rope_scaling_factor, args.rope_high_freq_factor)
    return torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), freqs)


def _scale_llama31(freqs: torch.Tensor, factor: float, high_freq_factor: float) -> torch.Tensor:
    # Llama 3.1 long-context scaling: long wavelengths are slowed by `factor`, short ones are
    # kept, and the band in between is interpolated (constants from Meta's reference).
    low_freq_factor, old_context_len = 1.0, 8192
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) like Meta's complex multiplication, in float32.

    x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim // 2).
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of a single query position (a decode step) against the whole cache, in float32.

    q: (batch, heads, 1, head_dim); k, v: (batch, kv_heads, seq, head_dim); mask: (1, 1, 1, seq).
    On CPU, scaled_dot_product_attention takes 10-20x longer than these three small products for
    one query (measured: 1 ms vs 0.08 ms a layer at a 256-token cache, 80 ms vs 3 ms at batch 8
    and 1152 tokens), which made attention a sizeable part of a decode step."""
    bsz, n_heads, _, head_dim = q.shape
    n_kv_heads = k.shape[1]
    # Query heads grouped under the key/value head they share (grouped-query attention).
    grouped = q.float().view(bsz, n_kv_heads, n_heads // n_kv_heads, head_dim)
    scores = grouped @ k.float().transpose(-1, -2) * head_dim**-0.5
    scores = torch.where(mask, scores, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.float()
    return out.view(bsz, n_heads, 1, head_dim).type_as(q)


class KVCache(nn.Module):
    """Preallocated keys and values, (batch, kv_heads, seq, head_dim), written in place."""

    def __init__(self, batch_size: int, n_kv_heads: int, seq_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # Head counts held by this module; tensor parallelism divides them by its degree.
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = self.kv_cache.update(input_pos, k, v)
        if seqlen == 1 and x.device.type == "cpu":
            y = one_query_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def setup_caches(self, batch_size: int, seq_len: int) -> None:
        """Allocate KV caches for `batch_size` sequences of up to `seq_len` tokens, plus the
        rotary tables and causal mask; call after the weights are materialized."""
        weight = self.output.weight
        device, dtype = weight.device, weight.dtype
        angles = rope_frequencies(self.args)[:seq_len].to(device)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
        self.register_buffer("causal_mask", causal, persistent=False)
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(batch_size, attn.n_kv_heads, seq_len, attn.head_dim, dtype, device)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """tokens: (batch, seq) at positions `input_pos` (seq,). Returns float32 logits for the
        last position, (batch, 1, vocab), or for every position if `all_logits`."""
        mask = self.causal_mask[input_pos][None, None]
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos, mask)
        if not all_logits:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()
