"""The decoding engine: continuous batching over a static KV cache, with Meta's semantics.

Each request owns one row ("slot") of the KV cache for its lifetime. A step admits waiting
requests into free slots (each prompt is prefilled on its own, from position 0, and its first
token sampled), then advances every other running sequence by one token in a single decode
step over all slots, each at its own position. Finished or cancelled requests free their slot
at once. The decode step always covers every slot, so its shapes never change: it compiles
once (one CUDA graph on GPU), and a row's result never depends on what the other rows hold.

Every rank runs the same schedule on the same replicated logits and samples with the same
per-request seeded generator, so all ranks pick the same tokens. generate(), the chat, the
benchmark and the server all drive this one engine; they differ only in where requests come
from and what they do with the per-token events.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from llama.errors import UserError
from llama.logits_processing import LogitsInputs, LogitsParams, LogitsProcessor, process_logits, top_logprobs
from llama.model import Transformer
from llama.tokenizer import Tokenizer

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6  # 0 is greedy
    top_p: float = 0.9
    seed: int = 1


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


@dataclass
class Completion:
    tokens: list[int]  # generated ids only, without the stop token
    logprobs: list[float]  # log-probability of each generated token before temperature
    finish_reason: str | None = None


def check_prompt(tokens: list[int], max_seq_len: int, what: str = "prompt") -> None:
    if not tokens:
        raise UserError(f"{what} is empty; give some text to complete")
    if len(tokens) >= max_seq_len:
        raise UserError(f"{what} has {len(tokens)} tokens, at least max_seq_len {max_seq_len}; shorten it "
                        "or raise --max_seq_len")


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
                sampling: bool, processing: LogitsInputs | None = None) -> Sampled:
    """Each row's next token and its log-probability (before temperature). logits (rows, vocab).

    A row with temperature 0 is greedy; the others draw from the top-p nucleus of the
    tempered distribution (Meta's rule: keep the most likely tokens until the mass before
    them exceeds top_p) by inverting its cumulative sum at the row's `uniform` draw in [0, 1).
    With sampling=False every row is greedy and the sort is skipped. `processing`, when some
    row asks for it, changes the logits that are sampled (llama.logits_processing); log-
    probabilities stay those of the model's own logits."""
    logprobs = torch.log_softmax(logits, dim=-1)
    top = None
    if processing is not None:
        logits = process_logits(logits, processing)
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


# A decode step: (model, tokens, positions, temperature, top_p, uniform, sampling, processing) -> Sampled.
DecodeStep = Callable[..., Sampled]


def _decode_and_sample(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, temperature: torch.Tensor,
                       top_p: torch.Tensor, uniform: torch.Tensor, sampling: bool,
                       processing: LogitsInputs | None) -> Sampled:
    return sample_rows(model.decode(tokens, positions), temperature, top_p, uniform, sampling, processing)


def _compile_decode(device_type: str) -> DecodeStep:
    """A compiled decode step for one model with one cache size (_decode_step keeps one for each).

    Before each call dynamo checks its guards, that nothing it traced has changed: on the
    model's modules that is about 4,000 guards, 1.7-2.9 ms a step of llama3.2-1b on CPU (its
    cache lookup, measured: a twentieth of an int4 step; CUDA graphs do not remove it). A loaded
    model's modules do not change, and each compiled function, with its own entries
    (isolate_recompiles), serves one model and cache size, so those guards are dropped (0.1 ms);
    the guards on the step's arguments (shapes, greedy or sampling) stay."""
    cuda = device_type == "cuda"
    # On GPU, coordinate descent tuning (gpt-fast's setting) lets inductor generate the
    # products of a few rows as its own reductions, fused with int8 dequantization: measured on
    # an H200, one-row bf16 products read 3.5-4.1 TB/s against cuBLAS's 2.5-3.7, and int8
    # 1.7-3.0 TB/s against 0.65-0.72 for the unfused conversion, which writes a bf16 copy first.
    options = {"triton.cudagraphs": cuda, "coordinate_descent_tuning": cuda}
    if not _CAN_ISOLATE:  # older torch (as some GPU images carry): steps share one cache, told apart by guards
        return torch.compile(_decode_and_sample, fullgraph=True, dynamic=False, options=options)
    options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    return torch.compile(_decode_and_sample, fullgraph=True, dynamic=False, options=options, isolate_recompiles=True)


_CAN_ISOLATE = "isolate_recompiles" in inspect.signature(torch.compile).parameters


# Models whose decode steps run compiled (see use_compiled_decode), with their compiled steps by
# cache size.
_COMPILED_DECODE: weakref.WeakKeyDictionary[Transformer, dict[int, DecodeStep]] = weakref.WeakKeyDictionary()


def use_compiled_decode(model: Transformer) -> None:
    """Run `model`'s decode steps (forward and sampling) through torch.compile in every
    engine from now on; prefill stays eager. The step has fixed shapes (every cache slot,
    one token each, against the static cache), so it compiles once per cache size (twice if
    both greedy and sampled requests come), not once per token or per request. CUDA graphs
    on GPU; inductor's C++ kernels on CPU."""
    _COMPILED_DECODE.setdefault(model, {})


def _decode_step(model: Transformer) -> DecodeStep:
    compiled = _COMPILED_DECODE.get(model)
    if compiled is None:
        return _decode_and_sample
    if model.cache_rows not in compiled:
        compiled[model.cache_rows] = _compile_decode(model.output.weight.device.type)
    return compiled[model.cache_rows]


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


@dataclass(eq=False)
class _Sequence:
    """A running request in its cache slot."""

    request: Request
    slot: int
    generator: torch.Generator
    last_token: int = -1
    generated: int = 0

    @property
    def position(self) -> int:
        """Where the last token goes in the next decode step."""
        return len(self.request.prompt) + self.generated - 1


@dataclass
class Engine:
    """Continuous batching of requests over `model`'s cache slots. Every rank must hold an
    engine fed with the same requests and cancellations in the same order."""

    model: Transformer
    slots: int
    tokenizer: Tokenizer | None = None  # for requests with a grammar
    waiting: collections.deque[Request] = field(default_factory=collections.deque)

    def __post_init__(self) -> None:
        self.model.setup_caches(self.slots)
        self.device = self.model.output.weight.device
        self.running: list[_Sequence | None] = [None] * self.slots
        self.processor = LogitsProcessor(self.slots, self.model.args.vocab_size, self.device, self.tokenizer)
        self._step = functools.partial(_decode_step(self.model), self.model)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(self.running)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.running)

    def submit(self, request: Request) -> None:
        check_prompt(request.prompt, self.model.args.max_seq_len, f"request {request.id}")
        self.waiting.append(request)

    def cancel(self, request_id: int) -> TokenEvent | None:
        """Drop a waiting or running request now; its slot is free for the next step."""
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                return TokenEvent(request_id, None, None, FINISH_CANCELLED)
        for i, seq in enumerate(self.running):
            if seq is not None and seq.request.id == request_id:
                self._free(seq)
                return TokenEvent(request_id, None, None, FINISH_CANCELLED)
        return None

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Admit what fits, then give every other running sequence one more token."""
        decoding = [s for s in self.running if s is not None]
        events = []
        while self.waiting and None in self.running:
            events.append(self._admit(self.waiting.popleft(), self.running.index(None)))
        if decoding:
            events += self._decode(decoding)
        return events

    def _admit(self, request: Request, slot: int) -> TokenEvent:
        seq = _Sequence(request, slot, torch.Generator().manual_seed(request.sampling.seed))
        self.running[slot] = seq
        self.processor.admit(slot, request.prompt, request.stop_ids, request.logits)
        prompt = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
        logits = self.model(prompt, cache_rows=torch.tensor([slot], device=self.device))[:, -1]
        params = self._sampling_tensors([seq])
        processing = self.processor.inputs(slice(slot, slot + 1)) if self.processor.active([slot]) else None
        tokens, logprobs, top = sample_rows(logits, *params, sampling=request.sampling.temperature > 0,
                                            processing=processing)
        return self._finish_step([seq], [0], tokens, logprobs, top)[0]

    def _decode(self, decoding: list[_Sequence]) -> list[TokenEvent]:
        rows = self.running
        # A free slot computes a dummy token at position 0 of its own row, which the next
        # prompt's prefill overwrites. A sequence admitted in this step re-feeds its first
        # token at its position, writing the same keys and values the next step will write.
        tokens = [0 if s is None else s.last_token for s in rows]
        positions = [0 if s is None else s.position for s in rows]
        inputs = torch.tensor([tokens, positions], dtype=torch.long).to(self.device)
        sampling = any(s.request.sampling.temperature > 0 for s in decoding)
        params = self._sampling_tensors([s if s in decoding else None for s in rows])
        active = self.processor.active([s.slot for s in decoding])
        processing = self.processor.inputs(slice(0, self.slots)) if active else None
        kernels = single_row_kernels(self.device) if self.slots == 1 else contextlib.nullcontext()
        with kernels:
            next_tokens, logprobs, top = self._step(inputs[0], inputs[1], *params, sampling, processing)
        return self._finish_step(decoding, [s.slot for s in decoding], next_tokens, logprobs, top)

    def _finish_step(self, sequences: list[_Sequence], rows: list[int], tokens: torch.Tensor, logprobs: torch.Tensor,
                     top: tuple[torch.Tensor, torch.Tensor] | None) -> list[TokenEvent]:
        """The events of the tokens sampled for `sequences` (at `rows` of the step's tensors)."""
        # One transfer brings both back (token ids are exact in float64).
        chosen, chosen_logprobs = torch.stack((tokens.double(), logprobs.double())).tolist()
        sampled = {s.slot: int(chosen[row]) for s, row in zip(sequences, rows)}
        complete = self.processor.accept(sampled)  # slots whose grammar can take nothing more
        top_values, top_ids = (t.tolist() for t in top) if top is not None else ([], [])
        events = []
        for s, row in zip(sequences, rows):
            k = s.request.logits.top_logprobs
            alternatives = tuple(zip(top_ids[row][:k], top_values[row][:k])) if k else ()
            events.append(self._advance(s, sampled[s.slot], chosen_logprobs[row], s.slot in complete, alternatives))
        return events

    def _sampling_tensors(self, rows: list[_Sequence | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Temperature, top_p and a uniform draw per row: drawn from the row's own generator
        only when it samples, so a request's draws do not depend on its neighbours."""
        values = []
        for seq in rows:
            params = seq.request.sampling if seq is not None else SamplingParams(temperature=0.0)
            draw = torch.rand((), generator=seq.generator).item() if params.temperature > 0 else 0.0
            values.append((params.temperature, params.top_p, draw))
        temperature, top_p, uniform = torch.tensor(values, dtype=torch.float32).T.to(self.device)
        return temperature, top_p, uniform

    def _advance(self, seq: _Sequence, token: int, logprob: float, complete: bool,
                 top: tuple[tuple[int, float], ...]) -> TokenEvent:
        """`complete`: the request's grammar is satisfied and can take no more, so it stops here."""
        request = seq.request
        if token in request.stop_ids:
            self._free(seq)
            return TokenEvent(request.id, None, None, FINISH_STOP)
        seq.last_token = token
        seq.generated += 1
        full = len(request.prompt) + seq.generated >= self.model.args.max_seq_len
        finish = FINISH_STOP if complete else FINISH_LENGTH if seq.generated >= request.max_new_tokens or full else None
        if finish is not None:
            self._free(seq)
        return TokenEvent(request.id, token, logprob, finish, top)

    def _free(self, seq: _Sequence) -> None:
        self.running[seq.slot] = None
        self.processor.release(seq.slot)


def check_prompts(prompt_tokens: list[list[int]], max_seq_len: int) -> None:
    if not prompt_tokens:
        raise UserError("no prompt given; pass --prompt TEXT or --prompt_file FILE")
    for i, tokens in enumerate(prompt_tokens):
        check_prompt(tokens, max_seq_len, f"prompt {i}")


def generate(model: Transformer, prompt_tokens: list[list[int]], max_gen_len: int, stop_ids: frozenset[int],
             temperature: float = 0.6, top_p: float = 0.9, seed: int = 1,
             on_tokens: Callable[[list[int | None]], None] | None = None) -> list[Completion]:
    """Complete each prompt with up to `max_gen_len` tokens, stopping early at a stop id.
    Up to max_batch_size prompts run at once; the rest wait for a free slot.

    on_tokens, if given, is called after every step with the token each prompt just got
    (None for a prompt waiting, finished, or ended by a stop id in this step): for
    streaming. Every rank must call generate() with the same arguments."""
    check_prompts(prompt_tokens, model.args.max_seq_len)
    engine = Engine(model, min(len(prompt_tokens), model.args.max_batch_size))
    sampling = SamplingParams(temperature, top_p, seed)
    for i, tokens in enumerate(prompt_tokens):
        engine.submit(Request(i, tokens, max_gen_len, stop_ids, sampling))
    completions = [Completion([], []) for _ in prompt_tokens]
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
    return completions
