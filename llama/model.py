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

from llama import cpu_linear
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


def rope_tables(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope's tables from rope_frequencies' angles: (positions, head_dim) each, cos(a_i)
    at columns 2i and 2i+1, and -sin(a_i), sin(a_i)."""
    cos, sin = angles.cos(), angles.sin()
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) like Meta's complex multiplication, in float32:
    (x[2i] cos - x[2i+1] sin, x[2i+1] cos + x[2i] sin), the same products and sums.

    x: (batch, seq, heads, head_dim); cos, sin: rope_tables' rows, (batch or 1, seq, head_dim).
    Elementwise over whole rows (half the operators of rotating real and imaginary parts apart:
    measured 25 against 55 us a call in an eager CPU decode step)."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x[2i+1], x[2i])
    return (xf * cos[:, :, None] + swapped * sin[:, :, None]).type_as(x)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Attention of one query per sequence (a decode step) against its cache row, up to its position.

    q: (batch, heads, 1, head_dim); k, v: (batch, kv_heads, seq, head_dim); positions: (batch, 1).
    On CPU, llama.cpu_linear's kernel, which reads each cached key and value once and only up to
    the position; elsewhere (and where it does not build) torch_one_query_attention."""
    if cpu_linear.decode_attention_applies(q, k, v):
        return cpu_linear.decode_attention(q, k, v, positions)
    mask = torch.arange(k.shape[2], device=q.device) <= positions
    return torch_one_query_attention(q, k, v, mask[:, None, None, :])


def torch_one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """one_query_attention in torch operators, over the whole cache row under mask (batch, 1, 1, seq).

    Query heads are grouped under the key/value head they share, so grouped-query attention
    reads each cached head once, as a batched matrix product, instead of repeating K/V per
    query head (what scaled_dot_product_attention's math fallback does when given a mask).
    On CPU the products run in float32: scaled_dot_product_attention took 10-20x longer for
    one query (measured: 1 ms vs 0.08 ms a layer at a 256-token cache) and bf16 batched
    products are slow there. On GPU they stay in the cache's dtype with a float32 softmax."""
    bsz, n_heads, _, head_dim = q.shape
    n_kv_heads = k.shape[1]
    compute = torch.float32 if q.device.type == "cpu" else q.dtype
    grouped = q.to(compute).view(bsz, n_kv_heads, n_heads // n_kv_heads, head_dim)
    scores = (grouped @ k.to(compute).transpose(-1, -2)).float() * head_dim**-0.5
    scores = torch.where(mask, scores, float("-inf"))
    out = torch.softmax(scores, dim=-1).to(compute) @ v.to(compute)
    return out.view(bsz, n_heads, 1, head_dim).type_as(q)


class KVCache(nn.Module):
    """Preallocated keys and values, (rows, kv_heads, max_seq_len, head_dim), written in place.
    Each row holds one sequence (a batch slot), at its own positions."""

    def __init__(self, rows: int, n_kv_heads: int, seq_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (rows, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("all_rows", torch.arange(rows, device=device), persistent=False)

    def write(self, rows: torch.Tensor | None, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """rows: (batch,), None for rows 0..batch-1 (a decode step); positions: (batch, seq);
        k, v: (batch, seq, kv_heads, head_dim)."""
        if rows is None:
            rows = self.all_rows[:k.shape[0]]
        self.k[rows[:, None], :, positions] = k
        self.v[rows[:, None], :, positions] = v


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
        # One product in place of wq, wk and wv where llama.quantize.pack_for_device made it: their
        # rows one after the other, so its output is q, k and v side by side.
        self.wqkv: nn.Module | None = None
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor | None) -> torch.Tensor:
        """With `rows`, x is whole sequences from position 0 (prefill), written to those cache
        rows; without, x is one token per cache row at `positions` (a decode step)."""
        bsz, seqlen, _ = x.shape
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            kv_width = self.n_kv_heads * self.head_dim
            q, k, v = self.wqkv(x).split((self.n_heads * self.head_dim, kv_width, kv_width), dim=-1)
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        decoding = rows is None
        if self.kv_cache is not None:
            self.kv_cache.write(rows, positions, k, v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if decoding:
            y = one_query_attention(q, self.kv_cache.k, self.kv_cache.v, positions)
        else:
            # A prompt attends only to itself: causal attention over its own keys, which
            # keeps the fused (flash / memory-efficient) kernels and reads no cache.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_hidden_dim, bias=False)
        # One product in place of w1 and w3 where llama.quantize.pack_for_device made it.
        self.w13: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (self.w1(x), self.w3(x)) if self.w13 is None else self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    @property
    def cache_rows(self) -> int:
        """How many sequences the KV cache holds (0 before setup_caches)."""
        cache = self.layers[0].attention.kv_cache
        return 0 if cache is None else cache.k.shape[0]

    def setup_caches(self, rows: int) -> None:
        """Allocate, once, KV caches for `rows` sequences of up to max_seq_len tokens and the
        rotary tables; call after the weights are materialized. Calling it again with the
        same size keeps the same tensors, so a compiled decode step (and its CUDA graph)
        stays valid across generations."""
        if rows == self.cache_rows:
            return
        weight = self.tok_embeddings.weight  # never quantized: its dtype is the activations'
        device, dtype = weight.device, weight.dtype
        cos, sin = rope_tables(rope_frequencies(self.args).to(device))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(rows, attn.n_kv_heads, self.args.max_seq_len, attn.head_dim, dtype, device)

    def forward(self, tokens: torch.Tensor, cache_rows: torch.Tensor | None = None,
                all_logits: bool = False) -> torch.Tensor:
        """Whole sequences from position 0 (a prompt's prefill, or training): tokens (batch, seq).
        With caches set up, their keys and values are written to `cache_rows` (default: rows
        0..batch-1). Returns float32 logits for the last position, (batch, 1, vocab), or for
        every position if `all_logits`."""
        bsz, seqlen = tokens.shape
        positions = torch.arange(seqlen, device=tokens.device)[None].expand(bsz, -1)
        if cache_rows is None:
            cache_rows = torch.arange(bsz, device=tokens.device)
        cos, sin = self._rotary_tables(tokens.device)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos[None, :seqlen], sin[None, :seqlen], positions, cache_rows)
        if not all_logits:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    def _rotary_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache_rows:  # allocated with the caches
            return self.rope_cos, self.rope_sin
        return rope_tables(rope_frequencies(self.args).to(device))  # training: no caches

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decode step for every cache row: tokens and positions (rows,). Returns float32
        logits (rows, vocab). Rows compute independently, so a sequence's result does not
        depend on what the other rows hold."""
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        h = self.tok_embeddings(tokens[:, None])
        for layer in self.layers:
            h = layer(h, cos, sin, positions[:, None], None)
        return self.output(self.norm(h))[:, 0].float()
