"""Batched autoregressive decoding with Meta's semantics.

Prompts of different lengths share positions: the batch is prefilled up to the shortest
prompt, then advanced one position at a time, taking the prompt's own token wherever a
sequence is still inside its prompt. Every rank computes the same replicated logits and
samples with an identically seeded generator, so all ranks pick the same tokens.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from llama.errors import UserError
from llama.model import Transformer


@dataclass
class Completion:
    tokens: list[int]  # generated ids only, without the stop token
    logprobs: list[float]  # log-probability of each generated token before temperature


def check_prompts(prompt_tokens: list[list[int]], max_seq_len: int, max_batch_size: int) -> None:
    if not prompt_tokens:
        raise UserError("no prompt given; pass --prompt TEXT or --prompt_file FILE")
    if len(prompt_tokens) > max_batch_size:
        raise UserError(f"{len(prompt_tokens)} prompts exceed max_batch_size {max_batch_size}; pass fewer prompts "
                        "or raise --max_batch_size")
    for i, tokens in enumerate(prompt_tokens):
        if len(tokens) >= max_seq_len:
            raise UserError(f"prompt {i} has {len(tokens)} tokens, at least max_seq_len {max_seq_len}; shorten it "
                            "or raise --max_seq_len")


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """Greedy at temperature 0, otherwise nucleus (top-p) sampling. logits: (batch, vocab)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def _forward(model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    return model(tokens, input_pos)


@functools.cache
def _compiled_forward(device_type: str) -> Callable[[Transformer, torch.Tensor, torch.Tensor], torch.Tensor]:
    mode = "reduce-overhead" if device_type == "cuda" else "default"
    return torch.compile(_forward, mode=mode, fullgraph=True, dynamic=False)


# Models whose decode steps generate() runs compiled (see use_compiled_decode).
_COMPILED_DECODE: weakref.WeakSet[Transformer] = weakref.WeakSet()


def use_compiled_decode(model: Transformer) -> None:
    """Run `model`'s one-token decode steps through torch.compile in every later generate()
    (prefill stays eager). The step has fixed shapes ((batch, 1) tokens against a static
    cache), so it compiles once per batch size and cache length, on the first call that
    needs it, not once per token. CUDA graphs on GPU; inductor's C++ kernels on CPU."""
    _COMPILED_DECODE.add(model)


@contextlib.contextmanager
def single_row_kernels(device: torch.device) -> Iterator[None]:
    """Kernel choice for products of one row (batch-1 decode) by a weight matrix. On CPU,
    oneDNN, which PyTorch picks for bf16, streams the weights at about 60% of the rate of
    ATen's own matrix-vector kernel (measured on AMD EPYC, 1 thread: 17 vs 27 GB/s, the
    same as fp16), so those steps bypass it; prefill and batched decode keep oneDNN, whose
    matrix-matrix products are the fast ones."""
    if device.type != "cpu":
        yield
        return
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


@torch.inference_mode()
def generate(model: Transformer, prompt_tokens: list[list[int]], max_gen_len: int, stop_ids: frozenset[int],
             temperature: float = 0.6, top_p: float = 0.9, seed: int = 1,
             on_tokens: Callable[[list[int | None]], None] | None = None) -> list[Completion]:
    """Complete each prompt with up to `max_gen_len` tokens, stopping early at a stop id.

    on_tokens, if given, is called after every step with the token each sequence just
    generated (None for a sequence still in its prompt or already finished): for streaming."""
    args = model.args
    check_prompts(prompt_tokens, args.max_seq_len, args.max_batch_size)
    device = model.output.weight.device
    lengths = [len(t) for t in prompt_tokens]
    total_len = min(args.max_seq_len, max_gen_len + max(lengths))
    model.setup_caches(len(prompt_tokens), total_len)

    tokens = torch.full((len(prompt_tokens), total_len), -1, dtype=torch.long, device=device)
    for i, t in enumerate(prompt_tokens):
        tokens[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    in_prompt = tokens != -1
    logprobs = torch.zeros(tokens.shape, dtype=torch.float32, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    completions = [Completion([], []) for _ in prompt_tokens]
    done = [max_gen_len <= 0] * len(prompt_tokens)  # the loop itself ends at total_len

    compiled = model in _COMPILED_DECODE
    decode_step = functools.partial(_compiled_forward(device.type), model) if compiled else model
    prev = 0
    for cur in range(min(lengths), total_len):
        one_token = cur - prev == 1
        forward = decode_step if one_token else model
        kernels = single_row_kernels(device) if one_token and len(prompt_tokens) == 1 else contextlib.nullcontext()
        with kernels:
            logits = forward(tokens[:, prev:cur], torch.arange(prev, cur, device=device))[:, -1]
        next_token = torch.where(in_prompt[:, cur], tokens[:, cur], sample(logits, temperature, top_p, generator))
        tokens[:, cur] = next_token
        logprobs[:, cur] = torch.log_softmax(logits, dim=-1).gather(-1, next_token[:, None]).squeeze(-1)
        prev = cur
        step = [None if done[i] or cur < n else t for i, (n, t) in enumerate(zip(lengths, next_token.tolist()))]
        for i, t in enumerate(step):
            if t is None:
                continue
            if t in stop_ids:
                step[i], done[i] = None, True
                continue
            completions[i].tokens.append(t)
            done[i] = len(completions[i].tokens) >= max_gen_len
        if on_tokens:
            on_tokens(step)
        if all(done):
            break

    for i, completion in enumerate(completions):
        start = lengths[i]
        completion.logprobs = logprobs[i, start:start + len(completion.tokens)].tolist()
    return completions
