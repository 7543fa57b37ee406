"""A request and its state in the engine: its tokens, how many of them the KV cache holds, and
the blocks that hold them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from llama.engine.sampler import SamplingParams
from llama.logits_processing import LogitsParams

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


@dataclass(frozen=True)
class Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int]
    sampling: SamplingParams = SamplingParams()
    logits: LogitsParams = LogitsParams()  # penalties, bias, grammar, top_logprobs


@dataclass(frozen=True)
class TokenEvent:
    """What one step did for one request: a new token (None when the step only ended it, at
    a stop id or a cancellation) and, once it is over, why it finished."""

    request_id: int
    token: int | None
    logprob: float | None  # of the token, before temperature
    finish_reason: str | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first, when asked


class Status(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted: its cache is to be (re)computed
    RUNNING = "running"  # holds blocks; prefilling, or decoding one token a step


@dataclass(eq=False)
class Sequence:
    """A request's tokens (prompt, then what was generated) and its place in the cache.

    The keys and values of token_ids[:num_computed] are in the blocks of block_table, in
    order, block_size tokens a block. While decoding, the last token is not computed yet: the
    next step computes it and samples the one after. A preempted sequence loses its blocks and
    computes all its tokens again (a prefill) when it is admitted anew."""

    request: Request
    generator: torch.Generator
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_keyed: int = 0  # leading blocks of block_table entered in the prefix cache
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt)

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.request.prompt)

    @property
    def num_uncomputed(self) -> int:
        """Tokens whose keys and values the cache does not hold yet (1 while decoding)."""
        return len(self.token_ids) - self.num_computed
