"""The grammar engine's costs on a typical JSON schema (README, "Structured outputs"):

    python3 tests/grammar_cost.py TOKENIZER_MODEL

the vocabulary's preparation (once per process), the schema's compilation (first and cached),
a request's matcher, and the mask + advance per token along a valid answer, in one thread; then
what constrained decoding adds to a step's sampling of 1 and 8 rows (every row constrained:
bitmasks, transfer, penalties and mask applied, top-20 logprobs, matchers advanced), timed
against plain sampling of the same logits in alternation."""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.engine.sampler import sample_rows  # noqa: E402
from llama.logits_processing import LogitsParams, LogitsProcessor  # noqa: E402
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

    for rows in (1, 8):
        sampling_cost(tokenizer, grammar, tokens, rows)


def sampling_cost(tokenizer: Tokenizer, grammar: str, answer: list[int], rows: int) -> None:
    """Median over PAIRS alternating steps of plain and constrained sampling (greedy, eager)."""
    processor = LogitsProcessor(rows, tokenizer.n_words, torch.device("cpu"), tokenizer)
    logits = torch.randn(rows, tokenizer.n_words, generator=torch.Generator().manual_seed(0))
    greedy = (torch.zeros(rows), torch.ones(rows), torch.zeros(rows))
    plain, constrained, step = [], [], 0
    while len(plain) < PAIRS:
        if step % len(answer) == 0:  # answers done: new requests
            for slot in range(rows):
                processor.release(slot)
                processor.admit(slot, [1], frozenset({tokenizer.eos_id}), LogitsParams(grammar=grammar))
        _, seconds = timed(lambda: sample_rows(logits, *greedy, sampling=False))
        plain.append(seconds)

        def constrained_step() -> None:
            sample_rows(logits, *greedy, sampling=False, processing=processor.inputs(list(range(rows))))
            processor.accept({slot: answer[step % len(answer)] for slot in range(rows)})

        constrained.append(timed(constrained_step)[1])
        step += 1
    ratios = [c - p for p, c in zip(plain, constrained)]
    print(f"{rows} row(s): sampling {statistics.median(plain) * 1e3:.2f} ms, constrained "
          f"{statistics.median(constrained) * 1e3:.2f} ms: +{statistics.median(ratios) * 1e3:.2f} ms a step "
          f"(median of {PAIRS} pairs)")


if __name__ == "__main__":
    main()
