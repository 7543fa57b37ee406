"""The Llama 2 / Llama 3.x transformer, with Meta's semantics and a paged KV cache.

The model knows nothing about parallelism: `llama.parallel` shards its linear layers and
tells each attention module how many heads it holds locally. Parameter names match the
keys of Meta's checkpoints, so a state dict maps one to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass
class PagedBatch:
    """Where a forward's tokens sit in the paged KV cache (built by llama.engine.model_runner).

    positions, slots: (tokens,), each token's position in its sequence and the cache slot
    (block * block_size + offset) its keys and values are written to. block_tables:
    (sequences, width), each sequence's blocks in order (unused entries are any valid block).
    query_lens and context_lens: for a prefill, each sequence's new tokens (laid out one
    sequence after another) and its length once they are in; None for a decode step, where
    each sequence has one token, at `positions`. decodes: in a prefill, how many sequences
    come first with one decode token each (at `positions`, block tables first); query_lens and
    context_lens describe the sequences after them."""

    positions: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    query_lens: list[int] | None = None
    context_lens: list[int] | None = None
    decodes: int = 0


def paged_decode_attention(q: torch.Tensor, cache: KVCache, block_tables: torch.Tensor,
                           positions: torch.Tensor) -> torch.Tensor:
    """Attention of one query per sequence (a decode step) against its cached keys, up to its position.

    q: (batch, heads, 1, head_dim); block_tables: (batch, width); positions: (batch,).
    On CPU, llama.cpu_linear's kernel, which follows the block table and reads each cached key
    and value once, only up to the position; elsewhere (and where it does not build)
    torch_paged_decode_attention."""
    if cpu_linear.decode_attention_applies(q, cache.k, cache.v):
        return cpu_linear.decode_attention(q, cache.k, cache.v, block_tables, positions)
    return torch_paged_decode_attention(q, cache, block_tables, positions)


def torch_paged_decode_attention(q: torch.Tensor, cache: KVCache, block_tables: torch.Tensor,
                                 positions: torch.Tensor) -> torch.Tensor:
    """paged_decode_attention in torch operators: each sequence's blocks gathered into one row,
    attended under a mask up to its position (reads block_tables' whole width).

    Query heads are grouped under the key/value head they share, so grouped-query attention
    reads each cached head once, as a batched matrix product, instead of repeating K/V per
    query head (what scaled_dot_product_attention's math fallback does when given a mask).
    On CPU the products run in float32: scaled_dot_product_attention took 10-20x longer for
    one query (measured: 1 ms vs 0.08 ms a layer at a 256-token cache) and bf16 batched
    products are slow there. On GPU they stay in the cache's dtype with a float32 softmax."""
    bsz, n_heads, _, head_dim = q.shape
    k, v = (cache.gather(t, block_tables) for t in (cache.k, cache.v))  # (batch, kv_heads, width * block, dim)
    n_kv_heads = k.shape[1]
    mask = (torch.arange(k.shape[2], device=q.device) <= positions[:, None])[:, None, None, :]
    compute = torch.float32 if q.device.type == "cpu" else q.dtype
    grouped = q.to(compute).view(bsz, n_kv_heads, n_heads // n_kv_heads, head_dim)
    scores = (grouped @ k.to(compute).transpose(-1, -2)).float() * head_dim**-0.5
    scores = torch.where(mask, scores, float("-inf"))
    out = torch.softmax(scores, dim=-1).to(compute) @ v.to(compute)
    return out.view(bsz, n_heads, 1, head_dim).type_as(q)


def paged_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                            batch: PagedBatch) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (q, k, v: (1, heads, tokens, head_dim), the
    sequences one after another) over its cached prefix and themselves.

    The first batch.decodes tokens are decode steps, attended together as a decode step's are.
    A sequence starting at position 0 attends only to its own keys (the fused kernels, no cache
    read: what a whole prompt's prefill always was); one continuing a cached prefix (a later
    chunk, or a prompt whose first blocks the prefix cache held) reads its blocks back."""
    outputs, start = [], batch.decodes
    if start:
        q_decode = q[0, :, :start].transpose(0, 1).unsqueeze(2)  # (decodes, heads, 1, head_dim)
        y = paged_decode_attention(q_decode, cache, batch.block_tables[:start], batch.positions[:start])
        outputs.append(y.squeeze(2).transpose(0, 1)[None])
    for i, (n, length) in enumerate(zip(batch.query_lens, batch.context_lens), start=batch.decodes):
        qi = q[:, :, start:start + n]
        gqa = q.shape[1] != k.shape[1]
        if n == length:
            ki, vi = k[:, :, start:start + n], v[:, :, start:start + n]
            outputs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa))
        else:
            table = batch.block_tables[i:i + 1]
            ki, vi = (cache.gather(t, table)[:, :, :length] for t in (cache.k, cache.v))
            query_positions = torch.arange(length - n, length, device=q.device)
            mask = torch.arange(length, device=q.device) <= query_positions[:, None]
            outputs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, enable_gqa=gqa))
        start += n
    return torch.cat(outputs, dim=2)


class KVCache(nn.Module):
    """One layer's pool of key and value blocks, (blocks, kv_heads, block_size, head_dim) each,
    written in place. A sequence's keys are spread over the blocks of its block table."""

    def __init__(self, blocks: int, n_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        shape = (blocks, n_kv_heads, block_size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots: (tokens,); k, v: (tokens, kv_heads, head_dim)."""
        blocks, offsets = slots // self.block_size, slots % self.block_size
        self.k[blocks, :, offsets] = k
        self.v[blocks, :, offsets] = v

    @staticmethod
    def gather(pool: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """The blocks of each table laid end to end: (sequences, kv_heads, width * block_size, head_dim)."""
        blocks = pool[block_tables]  # (sequences, width, kv_heads, block_size, head_dim)
        return blocks.transpose(1, 2).flatten(2, 3)


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PagedBatch | None) -> torch.Tensor:
        """Without `batch`, x is whole sequences from position 0 and no cache is used (training,
        parity checks); with it, x's keys and values go to the cache and attention reads it:
        x (1, tokens, dim) for a prefill, (sequences, 1, dim) for a decode step."""
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
        if batch is not None:
            self.kv_cache.write(batch.slots, k.flatten(0, 1), v.flatten(0, 1))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = self.n_heads != self.n_kv_heads
        if batch is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif batch.query_lens is None:
            y = paged_decode_attention(q, self.kv_cache, batch.block_tables, batch.positions)
        else:
            y = paged_prefill_attention(q, k, v, self.kv_cache, batch)
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PagedBatch | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, batch)
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
    def kv_cache_shape(self) -> tuple[int, int]:
        """(blocks, block_size) of the KV cache pool, (0, 0) before setup_kv_cache."""
        cache = self.layers[0].attention.kv_cache
        return (0, 0) if cache is None else (cache.k.shape[0], cache.block_size)

    def kv_cache_bytes_per_token(self) -> int:
        """What one token's keys and values take in this rank's cache, over all layers."""
        attn = self.layers[0].attention
        return 2 * len(self.layers) * attn.n_kv_heads * attn.head_dim * self.tok_embeddings.weight.element_size()

    def setup_kv_cache(self, blocks: int, block_size: int) -> None:
        """Allocate, once, a pool of `blocks` KV blocks of `block_size` tokens per layer and the
        rotary tables; call after the weights are materialized. Calling it again with the same
        shape keeps the same tensors, so a compiled decode step (and its CUDA graph) stays valid."""
        if (blocks, block_size) == self.kv_cache_shape:
            return
        weight = self.tok_embeddings.weight  # never quantized: its dtype is the activations'
        device, dtype = weight.device, weight.dtype
        for layer in self.layers:  # the old pool goes before the new one is allocated
            layer.attention.kv_cache = None
        cos, sin = rope_tables(rope_frequencies(self.args).to(device))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(blocks, attn.n_kv_heads, block_size, attn.head_dim, dtype, device)

    def forward(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Whole sequences from position 0, without the KV cache (training, parity checks):
        tokens (batch, seq). Returns float32 logits for the last position, (batch, 1, vocab),
        or for every position if `all_logits`."""
        seqlen = tokens.shape[1]
        cos, sin = rope_tables(rope_frequencies(self.args)[:seqlen].to(tokens.device))
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos[None], sin[None], None)
        if not all_logits:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    def prefill(self, tokens: torch.Tensor, batch: PagedBatch, last: torch.Tensor) -> torch.Tensor:
        """New tokens of one or more sequences, one after another, (tokens,), written to the cache
        at batch.slots. Returns float32 logits (len(last), vocab) at the token indices `last`."""
        cos, sin = self.rope_cos[batch.positions][None], self.rope_sin[batch.positions][None]
        h = self.tok_embeddings(tokens[None])
        for layer in self.layers:
            h = layer(h, cos, sin, batch)
        return self.output(self.norm(h[0, last])).float()

    def decode(self, tokens: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
        """One decode step: one token per sequence, tokens (sequences,). Returns float32 logits
        (sequences, vocab). Sequences compute independently, so one's result does not depend on
        what the others hold."""
        cos, sin = self.rope_cos[batch.positions][:, None], self.rope_sin[batch.positions][:, None]
        h = self.tok_embeddings(tokens[:, None])
        for layer in self.layers:
            h = layer(h, cos, sin, batch)
        return self.output(self.norm(h))[:, 0].float()
