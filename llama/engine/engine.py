"""The engine: requests in, token events out, one step at a time.

Each step the scheduler picks the work (decode every running sequence, prefill up to a chunk
of prompt tokens), the model runner computes it over the paged KV cache in one forward, the
sampler picks the new tokens, and the engine turns them into events, ending requests at a stop
id, their length limit or a cancellation and releasing their blocks. Every rank runs the same
engine on the same requests and cancellations in the same order, so all take the same steps.
generate() below, the chat, the benchmark and the server all drive this engine; they differ
only in where the requests come from and what they do with the events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llama.engine.block_manager import BlockManager
from llama.engine.model_runner import ModelRunner, is_compiled
from llama.engine.sampler import Sampler, SamplingParams
from llama.engine.scheduler import Scheduler
from llama.engine.sequence import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Request, Sequence, TokenEvent
from llama.errors import UserError
from llama.model import Transformer
from llama.tokenizer import Tokenizer

DEFAULT_BLOCK_SIZE = 16
DEFAULT_PREFILL_CHUNK = 512


@dataclass(frozen=True)
class EngineConfig:
    """An engine's sizes; what is None follows the model's arguments (max_batch_size sequences,
    max_seq_len tokens each) and, for the pool, holds max_num_seqs sequences of max_seq_len."""

    num_blocks: int | None = None  # the KV cache pool, block_size tokens a block
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_seqs: int | None = None  # sequences running at once (decoded together)
    max_seq_len: int | None = None  # longest prompt + completion; at most the model's max_seq_len
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt tokens a step computes, at most
    prefix_caching: bool = True


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    blocks_used: int
    blocks_total: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    preemptions: int


class Engine:
    """Continuous batching of requests over `model`'s paged KV cache. Every rank must hold an
    engine fed with the same requests and cancellations in the same order. `tokenizer` is needed
    for requests with a grammar only."""

    def __init__(self, model: Transformer, config: EngineConfig = EngineConfig(),
                 tokenizer: Tokenizer | None = None) -> None:
        self.model = model
        self.max_num_seqs = config.max_num_seqs or model.args.max_batch_size
        self.max_seq_len = min(config.max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
        self.block_size = config.block_size
        num_blocks = config.num_blocks or self.max_num_seqs * -(-self.max_seq_len // self.block_size)
        self.blocks = BlockManager(num_blocks, self.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.max_num_seqs, config.prefill_chunk)
        self.runner = ModelRunner(model, num_blocks, self.block_size, self.max_num_seqs, self.max_seq_len)
        self.sampler = Sampler(self.max_num_seqs, model.args.vocab_size, self.runner.device, tokenizer,
                               compiled=is_compiled(model))
        self.sequences: dict[int, Sequence] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.block_size

    @property
    def busy(self) -> bool:
        return bool(self.sequences)

    @property
    def active(self) -> int:
        """Requests holding blocks (prefilling or decoding)."""
        return len(self.scheduler.running)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.blocks.num_used,
                           self.blocks.num_blocks, self.blocks.queried_tokens, self.blocks.hit_tokens,
                           self.scheduler.preemptions)

    def check(self, prompt: list[int], what: str = "prompt") -> None:
        """A UserError if `prompt` can never be served: empty, or no room for one new token
        within max_seq_len or the whole pool."""
        if not prompt:
            raise UserError(f"{what} is empty; give some text to complete")
        if len(prompt) >= self.max_seq_len:
            raise UserError(f"{what} has {len(prompt)} tokens, at least max_seq_len {self.max_seq_len}; shorten it "
                            "or raise --max_seq_len")
        if len(prompt) >= self.capacity_tokens:
            raise UserError(f"{what} has {len(prompt)} tokens, at least the KV cache's {self.capacity_tokens}; "
                            "shorten it or raise --kv_cache_tokens / --kv_cache_memory")

    def submit(self, request: Request) -> None:
        self.check(request.prompt, f"request {request.id}")
        seq = Sequence(request, torch.Generator().manual_seed(request.sampling.seed))
        self.sequences[request.id] = seq
        self.scheduler.add(seq)

    def cancel(self, request_id: int) -> TokenEvent | None:
        """Drop a waiting or running request now; its blocks are free for the next step."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return None
        self._finish(seq)
        return TokenEvent(request_id, None, None, FINISH_CANCELLED)

    def prefill_last_chunk(self, prompt: list[int]) -> None:
        """Compute only the last prefill chunk of `prompt`, its earlier tokens taken as computed
        (their cache entries are whatever the pool holds): the step that needs the most memory
        for a prompt this long, whose attention reads its whole context, in one chunk's time
        (computing every chunk takes time that grows with the prompt's square: half an hour for
        65,535 tokens of a 1B model on one CPU core). For a warm-up: the engine must be idle."""
        self.check(prompt)
        seq = Sequence(Request(-1, prompt, 1, frozenset(), SamplingParams(temperature=0.0)), torch.Generator())
        n = min(len(prompt), self.scheduler.prefill_chunk)
        if not self.blocks.grow(seq, len(prompt)):
            raise RuntimeError("prefill_last_chunk needs an idle engine")
        seq.num_computed = len(prompt) - n
        try:
            self.runner.prefill([(seq, n)], [seq])
        finally:
            self.blocks.release(seq)

    def step(self) -> list[TokenEvent]:
        """Schedule, compute and sample one step; the events of the requests it advanced or ended."""
        plan = self.scheduler.schedule()
        for seq in plan.preempted:
            self.sampler.release(seq)
        events = [self._end(seq, FINISH_LENGTH) for seq in plan.out_of_room]
        if plan.prefill:  # the decoding sequences' tokens go in the same forward
            done = [seq for seq, n in plan.prefill if n == seq.num_uncomputed]
            logits = self.runner.prefill(plan.prefill, done, plan.decode)
            for seq, n in plan.prefill:
                seq.num_computed += n
                self.blocks.cache_computed_blocks(seq)
            sampled = plan.decode + done
        elif plan.decode:
            logits = self.runner.decode(plan.decode)
            sampled = plan.decode
        else:
            return events
        for seq in plan.decode:
            seq.num_computed += 1
        if sampled:
            events += self._advance(sampled, logits)
        return events

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        events = []
        for seq, sampled in zip(seqs, self.sampler(logits, seqs)):
            self.blocks.cache_computed_blocks(seq)
            request = seq.request
            if sampled.token in request.stop_ids:
                events.append(self._end(seq, FINISH_STOP))
                continue
            seq.token_ids.append(sampled.token)
            full = len(seq.token_ids) >= self.max_seq_len
            finish = (FINISH_STOP if sampled.complete  # its grammar can take nothing more
                      else FINISH_LENGTH if seq.num_generated >= request.max_new_tokens or full else None)
            if finish:
                self._finish(seq)
            events.append(TokenEvent(request.id, sampled.token, sampled.logprob, finish, sampled.top_logprobs))
        return events

    def _end(self, seq: Sequence, reason: str) -> TokenEvent:
        self._finish(seq)
        return TokenEvent(seq.id, None, None, reason)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.sampler.release(seq)
        del self.sequences[seq.id]


@dataclass
class Completion:
    tokens: list[int]  # generated ids only, without the stop token
    logprobs: list[float]  # log-probability of each generated token before temperature
    finish_reason: str | None = None


def check_prompts(engine: Engine, prompt_tokens: list[list[int]]) -> None:
    if not prompt_tokens:
        raise UserError("no prompt given; pass --prompt TEXT or --prompt_file FILE")
    for i, tokens in enumerate(prompt_tokens):
        engine.check(tokens, f"prompt {i}")


def generate(engine: Engine, prompt_tokens: list[list[int]], max_gen_len: int, stop_ids: frozenset[int],
             temperature: float = 0.6, top_p: float = 0.9, seed: int = 1,
             on_tokens: Callable[[list[int | None]], None] | None = None) -> list[Completion]:
    """Complete each prompt with up to `max_gen_len` tokens, stopping early at a stop id. The
    engine runs as many at once as it holds; the rest wait.

    on_tokens, if given, is called after every step with the token each prompt just got
    (None for a prompt waiting, finished, or ended by a stop id in this step): for
    streaming. Every rank must call generate() with the same arguments."""
    check_prompts(engine, prompt_tokens)
    sampling = SamplingParams(temperature, top_p, seed)
    for i, tokens in enumerate(prompt_tokens):
        engine.submit(Request(i, tokens, max_gen_len, stop_ids, sampling))
    completions = [Completion([], []) for _ in prompt_tokens]
    try:
        while engine.busy:
            step: list[int | None] = [None] * len(prompt_tokens)
            for event in engine.step():
                completion = completions[event.request_id]
                if event.token is not None:
                    completion.tokens.append(event.token)
                    completion.logprobs.append(event.logprob)
                    step[event.request_id] = event.token
                completion.finish_reason = event.finish_reason
            if on_tokens:
                on_tokens(step)
    finally:  # interrupted (on_tokens raised): the engine may serve again
        for i in range(len(prompt_tokens)):
            engine.cancel(i)
    return completions
