"""Per-request changes to the logits before sampling: penalties, biases, grammars, min_tokens,
and the top log-probabilities a request asks to see.

A penalty or a bias changes only the tokens it names (those of the prompt, those generated,
those biased): `penalize` writes exactly those, a few hundred entries, instead of transforming
the whole vocabulary (over Llama 3's 128k tokens, the dense transforms cost 2 ms a row on a CPU;
a grammar's mask needs the whole row anyway). Being sparse, their number changes every step, so
`penalize` runs eagerly, before the compiled sampling step; the bitmask has a fixed shape and is
applied inside it (`apply_bitmask`). A row that asks for nothing has no entries and every token
allowed, so its logits do not change, exactly. The per-row state (token counts, bias, grammar
matcher) lives in `LogitsProcessor`, one row per running sequence (llama.engine.sampler hands
them out).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from llama.tokenizer import Tokenizer

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class LogitsParams:
    """What one request asks of its logits. The defaults change nothing."""

    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted once per time a token was generated
    repetition_penalty: float = 1.0  # vLLM/CTRL: tokens of the prompt or output, positive logits divided
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # stop ids are masked out until this many tokens were generated
    top_logprobs: int = 0  # alternatives returned with each token
    grammar: str | None = None  # an llguidance grammar (llama.structured) the output must match

    @property
    def asks_anything(self) -> bool:
        return self != LogitsParams()

    @property
    def repetition(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def presence_or_frequency(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class Entries(NamedTuple):
    """Sparse values over a step's logits: entry i is at (rows[i], ids[i]), each pair once."""

    rows: torch.Tensor  # (n,) int64
    ids: torch.Tensor  # (n,) int64
    values: torch.Tensor  # (n,) float32, what the entry means depends on its use


class LogitsInputs(NamedTuple):
    """The step's processing inputs (rows = the step's rows)."""

    repeated: Entries  # tokens of the prompt or generated, for rows with a repetition penalty: the penalty
    generated: Entries  # generated tokens, for rows with a presence or frequency penalty: their counts
    penalties: torch.Tensor  # (rows, 2) float32: presence, frequency
    biased: Entries  # logit_bias: the value added
    bitmask: torch.Tensor  # (rows, ceil(vocab / 32)) int32: bit t % 32 of word t // 32 allows token t


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, words) int32 -> (rows, vocab) bool: which tokens are allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask[:, :, None] >> bits) & 1).flatten(1)[:, :vocab].bool()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf where the row's bitmask forbids a token."""
    return logits.masked_fill(~unpack_bitmask(bitmask, logits.shape[-1]), float("-inf"))


def penalize(logits: torch.Tensor, inputs: LogitsInputs) -> torch.Tensor:
    """The logits with the repetition penalty r on every token in `repeated` (a positive logit
    divided by r, a negative one multiplied, as CTRL and vLLM do), then OpenAI's presence and
    frequency penalties on the generated ones, logit[j] -= frequency * count[j] + presence *
    (count[j] > 0), then the biases added. Every other logit is untouched. Always a new tensor:
    the compiled sampling step takes both, and inputs that alias would make it compile again."""
    logits = logits.clone()
    rows, ids, repetition = inputs.repeated
    if ids.numel():
        chosen = logits[rows, ids]
        logits[rows, ids] = torch.where(chosen > 0, chosen / repetition, chosen * repetition)
    rows, ids, counts = inputs.generated
    if ids.numel():
        presence, frequency = inputs.penalties[rows].T
        # The order of the dense definition's operations, so the result is the same to the bit.
        logits[rows, ids] = logits[rows, ids] - counts * frequency - presence
    rows, ids, bias = inputs.biased
    if ids.numel():
        logits[rows, ids] += bias
    return logits


def top_logprobs(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's MAX_TOP_LOGPROBS most likely tokens: (logprobs, ids), most likely first."""
    return logprobs.topk(MAX_TOP_LOGPROBS, dim=-1)


@dataclass
class _Row:
    params: LogitsParams
    stop_ids: frozenset[int]
    matcher: object | None  # llama.structured.Matcher
    prompt_ids: torch.Tensor  # the prompt's distinct tokens (for the repetition penalty only)
    prompt_set: frozenset[int]
    bias_ids: torch.Tensor
    bias_values: torch.Tensor
    counts: Counter[int] = field(default_factory=Counter)  # generated token -> times
    new_ids: list[int] = field(default_factory=list)  # generated tokens not in the prompt, first seen first
    generated: int = 0


@dataclass
class LogitsProcessor:
    """The processing state of an engine's slots. Every rank holds one and updates it with the
    same tokens, so all compute the same inputs (grammars included: each rank runs its own
    matcher over the same tokens)."""

    slots: int
    vocab: int
    device: torch.device
    tokenizer: Tokenizer | None = None  # needed for grammars only
    rows: list[_Row | None] = field(init=False)

    def __post_init__(self) -> None:
        self.rows = [None] * self.slots
        self.bitmask = torch.full((self.slots, (self.vocab + 31) // 32), -1, dtype=torch.int32)  # on the CPU

    def admit(self, slot: int, prompt: list[int], stop_ids: frozenset[int], params: LogitsParams) -> None:
        """Give `slot` to a new request (every request, so the slot's old state is cleared)."""
        self.rows[slot] = None
        if not params.asks_anything:
            return
        matcher = None
        if params.grammar is not None:
            from llama.structured import Matcher

            assert self.tokenizer is not None, "a grammar needs the engine's tokenizer"
            matcher = Matcher(self.tokenizer, params.grammar)
        prompt_set = frozenset(prompt) if params.repetition else frozenset()
        ids, values = zip(*params.logit_bias) if params.logit_bias else ((), ())
        self.rows[slot] = _Row(params, stop_ids, matcher, torch.tensor(sorted(prompt_set), dtype=torch.int64),
                               prompt_set, torch.tensor(ids, dtype=torch.int64),
                               torch.tensor(values, dtype=torch.float32))

    def release(self, slot: int) -> None:
        self.rows[slot] = None

    def active(self, slots: list[int]) -> bool:
        """Whether any of these slots changes its logits (else the step skips processing)."""
        return any(self.rows[s] is not None for s in slots)

    def inputs(self, slots: list[int]) -> LogitsInputs:
        """The processing inputs of these slots, in this order, for this step (the bitmask is
        computed now)."""
        self.bitmask[slots] = -1
        repeated, generated, biased = _EntriesBuilder(), _EntriesBuilder(), _EntriesBuilder()
        penalties = torch.zeros(len(slots), 2)
        for i, slot in enumerate(slots):
            row = self.rows[slot]
            if row is None:
                continue
            if row.params.repetition:
                ids = torch.cat((row.prompt_ids, torch.tensor(row.new_ids, dtype=torch.int64)))
                repeated.add(i, ids, torch.full(ids.shape, row.params.repetition_penalty))
            if row.params.presence_or_frequency and row.counts:
                penalties[i, 0], penalties[i, 1] = row.params.presence_penalty, row.params.frequency_penalty
                generated.add(i, torch.tensor(list(row.counts)), torch.tensor(list(row.counts.values()),
                                                                             dtype=torch.float32))
            biased.add(i, row.bias_ids, row.bias_values)
            if row.matcher is not None:
                row.matcher.fill_bitmask(self.bitmask, slot)
            if row.generated < row.params.min_tokens:
                for stop in row.stop_ids:
                    self.bitmask[slot, stop // 32] &= ~_bit(stop % 32)
        return LogitsInputs(repeated.build(self.device), generated.build(self.device),
                            penalties.to(self.device, non_blocking=True), biased.build(self.device),
                            self.bitmask[slots].to(self.device, non_blocking=True))

    def accept(self, sampled: dict[int, int]) -> set[int]:
        """Record the token each slot sampled (slot -> token); returns the slots whose grammar
        is now complete (their requests are done)."""
        done = set()
        for slot, token in sampled.items():
            row = self.rows[slot]
            if row is None:
                continue
            row.generated += 1
            if row.params.repetition and token not in row.counts and token not in row.prompt_set:
                row.new_ids.append(token)
            row.counts[token] += 1
            if row.matcher is not None:
                row.matcher.accept(token)
                if row.matcher.done:
                    done.add(slot)
        return done


class _EntriesBuilder:
    """Collects a step's entries row by row, then moves them to the device at once."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def add(self, row: int, ids: torch.Tensor, values: torch.Tensor) -> None:
        if ids.numel():
            self.rows.append(torch.full(ids.shape, row, dtype=torch.int64))
            self.ids.append(ids)
            self.values.append(values)

    def build(self, device: torch.device) -> Entries:
        if not self.ids:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return Entries(empty, empty, empty.float())
        return Entries(*(torch.cat(parts).to(device, non_blocking=True) for parts in (self.rows, self.ids, self.values)))


def _bit(i: int) -> int:
    """The int32 value with only bit i set (bit 31 is the sign)."""
    return 1 << i if i < 31 else -(1 << 31)
