"""The grammar engine's costs on a typical JSON schema (README, "Structured outputs"):

    python3 tests/grammar_cost.py TOKENIZER_MODEL

the vocabulary's preparation (once per process), the schema's compilation (first and cached),
a request's matcher, and the mask + advance per token along a valid answer, in one thread."""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


if __name__ == "__main__":
    main()
