"""The grammar engine's costs on a typical JSON schema (README, "Structured outputs"):

    python3 tests/grammar_cost.py TOKENIZER_MODEL

the vocabulary's preparation (once per process), the schema's compilation (first and cached),
a request's matcher, and the mask + advance per token along a valid answer, in one thread; then
what constrained decoding adds to a step's sampling of 1 and 8 rows, eager and compiled (every
row constrained and penalized: bitmasks, transfer, penalties and mask applied, matchers
advanced), timed against plain sampling of the same logits in alternation."""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.engine.sampler import sample_rows  # noqa: E402
from llama.logits_processing import LogitsParams, LogitsProcessor, penalize  # noqa: E402
from llama.structured import Matcher, grammar_tokenizer, json_schema_grammar  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "email": {"type": "string", "format": "email"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                "required": ["street", "city"], "additionalProperties": False},
    "role": {"enum": ["admin", "user", "guest"]}},
    "required": ["name", "age", "email", "tags", "address", "role"], "additionalProperties": False}
ANSWER = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "tags": ["math", "poetry"],
          "address": {"street": "12 St James's Square", "city": "London"}, "role": "admin"}
RUNS = 5
PAIRS = 200


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    tokenizer = Tokenizer(Path(sys.argv[1]))
    _, vocabulary = timed(lambda: grammar_tokenizer(tokenizer))
    grammar, first = timed(lambda: json_schema_grammar(SCHEMA))
    _, cached = timed(lambda: json_schema_grammar(SCHEMA))
    matchers = [timed(lambda: Matcher(tokenizer, grammar)) for _ in range(RUNS)]
    tokens = tokenizer.encode(json.dumps(ANSWER, separators=(",", ":")), bos=False)
    bitmask = torch.zeros(1, (tokenizer.n_words + 31) // 32, dtype=torch.int32)
    first_masks, per_token = [], []
    for matcher, _ in matchers:
        for i, token in enumerate(tokens):
            _, seconds = timed(lambda: (matcher.fill_bitmask(bitmask, 0), matcher.accept(token)))
            (per_token if i else first_masks).append(seconds)
    print(f"vocabulary {vocabulary * 1e3:.0f} ms; schema compiled {first * 1e3:.2f} ms, again (cached) "
          f"{cached * 1e6:.0f} us; matcher {statistics.median(s for _, s in matchers) * 1e3:.2f} ms (median of "
          f"{RUNS}); first mask {statistics.median(first_masks) * 1e3:.2f} ms; mask + advance per token: median "
          f"{statistics.median(per_token) * 1e6:.0f} us, max {max(per_token) * 1e6:.0f} us ({len(per_token)} tokens)")

    for compiled in (False, True):
        for rows in (1, 8):
            sampling_cost(tokenizer, grammar, tokens, rows, compiled)


def sampling_cost(tokenizer: Tokenizer, grammar: str, answer: list[int], rows: int, compiled: bool) -> None:
    """Median over PAIRS alternating steps of plain and constrained sampling (greedy), each row
    constrained by the grammar, with a frequency and a repetition penalty over a 100-token
    prompt, as the engine's sampler runs it: inputs built, penalties applied eagerly, the mask
    in the (compiled or eager) sampling step, matchers advanced."""
    step_fn = torch.compile(sample_rows, fullgraph=True, dynamic=False) if compiled else sample_rows
    processor = LogitsProcessor(rows, tokenizer.n_words, torch.device("cpu"), tokenizer)
    logits = torch.randn(rows, tokenizer.n_words, generator=torch.Generator().manual_seed(0))
    greedy = (torch.zeros(rows), torch.ones(rows), torch.zeros(rows))
    prompt = torch.randint(tokenizer.n_words, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    params = LogitsParams(grammar=grammar, frequency_penalty=0.5, repetition_penalty=1.1)
    plain, constrained, step = [], [], 0

    def constrained_step() -> None:
        inputs = processor.inputs(list(range(rows)))
        step_fn(logits, *greedy, sampling=False, processing=(penalize(logits, inputs), inputs.bitmask))
        processor.accept({slot: answer[step % len(answer)] for slot in range(rows)})

    while len(plain) < PAIRS:
        if step % len(answer) == 0:  # answers done: new requests
            for slot in range(rows):
                processor.release(slot)
                processor.admit(slot, prompt, frozenset({tokenizer.eos_id}), params)
        if step == 0:  # compile both variants before timing
            step_fn(logits, *greedy, sampling=False)
            constrained_step()
            step += 1
            continue
        plain.append(timed(lambda: step_fn(logits, *greedy, sampling=False))[1])
        constrained.append(timed(constrained_step)[1])
        step += 1
    added = [c - p for p, c in zip(plain, constrained)]
    print(f"{'compiled' if compiled else 'eager'}, {rows} row(s): sampling {statistics.median(plain) * 1e3:.2f} ms, "
          f"constrained {statistics.median(constrained) * 1e3:.2f} ms: +{statistics.median(added) * 1e3:.2f} ms a "
          f"step (median of {PAIRS} pairs)")


if __name__ == "__main__":
    main()
