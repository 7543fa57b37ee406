"""From a step's logits to each sequence's next token.

The model runner hands the sampler one row of float32 logits per sequence that needs a token
this step (rows past the last sequence are padding, ignored); the sampler turns each row into a
token with that sequence's parameters and its own seeded generator, so a request's tokens do
not depend on its neighbours, and every rank, sampling the same replicated logits with the same
generators, picks the same tokens. Requests that ask for logits processing (penalties, logit
bias, min_tokens, a grammar, top log-probabilities: llama.logits_processing) hold a row of the
processor's state while they run; a step where none does skips it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from llama.logits_processing import LogitsProcessor, apply_bitmask, penalize, top_logprobs
from llama.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llama.engine.sequence import Sequence

# Older torch (as some GPU images carry) lacks torch.compile's isolate_recompiles.
CAN_ISOLATE = "isolate_recompiles" in inspect.signature(torch.compile).parameters


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6  # 0 is greedy
    top_p: float = 0.9
    seed: int = 1


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's most likely token, the first of equals (as argmax). Compiled, the first index
    that holds the row's maximum: inductor's CPU argmax over a 128k vocabulary took 0.58 ms a
    row, these two reductions 0.12 (AVX2 EPYC, 2 threads), where eager argmax is no slower than
    they are. A row with a NaN gets the last token."""
    if not torch.compiler.is_compiling():
        return logits.argmax(dim=-1)
    vocab = logits.shape[-1]
    top = logits.amax(dim=-1, keepdim=True)
    first = torch.where(logits == top, torch.arange(vocab, device=logits.device), vocab).amin(dim=-1)
    return first.clamp(max=vocab - 1)


# What sampling returns: each row's token, its log-probability, and with processing the rows'
# top log-probabilities and their tokens.
Sampled = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor,
                sampling: bool, processing: tuple[torch.Tensor, torch.Tensor] | None = None) -> Sampled:
    """Each row's next token and its log-probability (before temperature). logits (rows, vocab).

    A row with temperature 0 is greedy; the others draw from the top-p nucleus of the
    tempered distribution (Meta's rule: keep the most likely tokens until the mass before
    them exceeds top_p) by inverting its cumulative sum at the row's `uniform` draw in [0, 1).
    With sampling=False every row is greedy and the sort is skipped. `processing`, when some
    row asks for it, is the penalized logits and the rows' bitmask (llama.logits_processing):
    tokens are drawn from those; log-probabilities stay those of the model's own logits."""
    logprobs = torch.log_softmax(logits, dim=-1)
    top = None
    if processing is not None:
        penalized, bitmask = processing
        logits = apply_bitmask(penalized, bitmask)
        top = top_logprobs(logprobs)
    tokens = greedy_tokens(logits)
    if sampling:
        probs = torch.softmax(logits / temperature.clamp_min(1e-5)[:, None], dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass = sorted_probs.cumsum(dim=-1)
        kept = mass - sorted_probs <= top_p[:, None]  # a prefix of the sorted tokens
        # One scan only: inductor (torch 2.11, CUDA) fails to compile a cumsum of a cumsum.
        total = mass.gather(-1, kept.sum(dim=-1, keepdim=True) - 1)
        index = (kept & (mass <= uniform[:, None] * total)).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
        sampled = order.gather(-1, index[:, None]).squeeze(-1)
        tokens = torch.where(temperature > 0, sampled, tokens)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1), top


class SampledToken(NamedTuple):
    token: int
    logprob: float  # before temperature and processing
    top_logprobs: tuple[tuple[int, float], ...]  # as many as the request asked for
    complete: bool  # the request's grammar can take nothing more


class Sampler:
    """Picks the next token of each sequence from its row of logits.

    max_rows: the most sequences sampled in one step. compiled: run sample_rows through
    torch.compile, once per number of rows (the decode step's batch-size buckets) and variant
    (greedy or sampling, with or without processing)."""

    def __init__(self, max_rows: int, vocab: int, device: torch.device, tokenizer: Tokenizer | None = None,
                 compiled: bool = False) -> None:
        # One processor row per running sequence, and one that no sequence takes, for padding.
        self.processor = LogitsProcessor(max_rows + 1, vocab, device, tokenizer)
        self.padding_row = max_rows
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self.rows: dict[int, int] = {}  # request id -> processor row
        self.compiled = compiled
        self._by_rows: dict[int, Callable[..., Sampled]] = {}

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        """logits: (rows >= len(seqs), vocab) float32, row i for seqs[i]; the token each sequence
        gets (its processing state, if any, advanced by it)."""
        rows = [self._row(seq) for seq in seqs] + [self.padding_row] * (logits.shape[0] - len(seqs))
        temperature, top_p, uniform = self._parameters(seqs, logits.shape[0], logits.device)
        sampling = any(seq.sampling.temperature > 0 for seq in seqs)
        processing = None
        if self.processor.active(rows):
            inputs = self.processor.inputs(rows)
            # Eager: the penalties' entries change in number every step (llama.logits_processing).
            processing = (penalize(logits, inputs), inputs.bitmask)
        tokens, logprobs, top = self._sample_rows(logits.shape[0])(logits, temperature, top_p, uniform, sampling,
                                                                   processing)
        # One transfer brings both back (token ids are exact in float64).
        chosen, chosen_logprobs = torch.stack((tokens.double(), logprobs.double())).tolist()
        complete = self.processor.accept({rows[i]: int(chosen[i]) for i in range(len(seqs))})
        top_values, top_ids = (t.tolist() for t in top) if top is not None else ([], [])
        out = []
        for i, seq in enumerate(seqs):
            k = seq.request.logits.top_logprobs
            alternatives = tuple(zip(top_ids[i][:k], top_values[i][:k])) if k else ()
            out.append(SampledToken(int(chosen[i]), chosen_logprobs[i], alternatives, rows[i] in complete))
        return out

    def release(self, seq: Sequence) -> None:
        """seq no longer runs (finished, or preempted: its state is rebuilt when it runs again)."""
        row = self.rows.pop(seq.id, None)
        if row is not None:
            self.processor.release(row)
            self.free_rows.append(row)

    def _row(self, seq: Sequence) -> int:
        """seq's processor row, given (with the state of the tokens it already generated) the first
        time it is sampled since it started or was last preempted."""
        if seq.id not in self.rows:
            row = self.rows[seq.id] = self.free_rows.pop()
            request = seq.request
            self.processor.admit(row, request.prompt, request.stop_ids, request.logits)
            for token in seq.token_ids[len(request.prompt):]:
                self.processor.accept({row: token})
        return self.rows[seq.id]

    def _sample_rows(self, rows: int) -> Callable[..., Sampled]:
        if not self.compiled:
            return sample_rows
        if rows not in self._by_rows:
            self._by_rows[rows] = torch.compile(sample_rows, fullgraph=True, dynamic=False,
                                                **({"isolate_recompiles": True} if CAN_ISOLATE else {}))
        return self._by_rows[rows]

    @staticmethod
    def _parameters(seqs: list[Sequence], rows: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Temperature, top_p and a uniform draw per row: drawn from the sequence's own generator
        only when it samples, so its draws do not depend on its neighbours. Padding rows are greedy."""
        values = [(0.0, 1.0, 0.0)] * rows
        for i, seq in enumerate(seqs):
            params = seq.sampling
            draw = torch.rand((), generator=seq.generator).item() if params.temperature > 0 else 0.0
            values[i] = (params.temperature, params.top_p, draw)
        temperature, top_p, uniform = torch.tensor(values, dtype=torch.float32).T.to(device)
        return temperature, top_p, uniform
