"""Printing a completion on rank 0 while it is generated.

A character outside ASCII may span several tokens (byte-level BPE in Llama 3, byte-fallback
pieces in sentencepiece); until its last byte arrives the decoded text ends in U+FFFD, so
that text is held back rather than printed broken.
"""

from __future__ import annotations

from collections.abc import Callable

from llama.distributed import log
from llama.engine import Completion, Engine, check_prompts, generate
from llama.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """Turns tokens arriving one at a time into text pieces whose concatenation is exactly
    tokenizer.decode(all tokens)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned

    def add(self, token: int) -> str:
        """The text that `token` completes; empty while a character is still partial."""
        self.tokens.append(token)
        # The whole completion is decoded each time: sentencepiece drops the leading space of
        # whatever comes first, so decoding a suffix alone would lose spaces. Once a character
        # is complete, later bytes never change the text before it, so what was returned stays
        # a prefix of the final decode.
        text = self.tokenizer.decode(self.tokens)
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._take(text)

    def flush(self) -> str:
        """The rest of the text once the completion is over, even if its last bytes are invalid."""
        return self._take(self.tokenizer.decode(self.tokens))

    def _take(self, text: str) -> str:
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def stream_completion(engine: Engine, tokenizer: Tokenizer, prompt_tokens: list[int], max_gen_len: int,
                      stop_ids: frozenset[int], temperature: float, top_p: float, seed: int,
                      after_step: Callable[[], None] | None = None) -> Completion:
    """Complete one prompt, printing the text on rank 0 as it grows (every rank must call it).

    after_step runs on every rank after each decoding step; an exception it raises ends the
    generation there, so it must be raised on all ranks at the same step."""
    decoder = IncrementalDecoder(tokenizer)

    def on_tokens(step: list[int | None]) -> None:
        if step[0] is not None:
            _write(decoder.add(step[0]))
        if after_step:
            after_step()

    [completion] = generate(engine, [prompt_tokens], max_gen_len, stop_ids, temperature, top_p, seed,
                            on_tokens=on_tokens)
    _write(decoder.flush())
    return completion


def _write(text: str) -> None:
    if text:
        log(text, end="")


def print_completions(engine: Engine, tokenizer: Tokenizer, prompt_tokens: list[list[int]], headers: list[str],
                      max_gen_len: int, stop_ids: frozenset[int], temperature: float, top_p: float, seed: int,
                      stream: bool) -> list[Completion]:
    """Complete every prompt, printing on rank 0 each header followed by its completion.

    Streaming decodes the prompts one after another, so each is printed as it grows."""
    if not stream:
        completions = generate(engine, prompt_tokens, max_gen_len, stop_ids, temperature, top_p, seed)
        for header, completion in zip(headers, completions):
            log(header + tokenizer.decode(completion.tokens), end="\n\n")
        return completions
    check_prompts(engine, prompt_tokens)  # errors name the right index
    completions = []
    for header, tokens in zip(headers, prompt_tokens):
        log(header, end="")
        completions.append(stream_completion(engine, tokenizer, tokens, max_gen_len, stop_ids, temperature, top_p,
                                             seed))
        log(end="\n\n")
    return completions
