"""Structured outputs: grammars that constrain what the model may write, through llguidance.

A request's JSON schema (or "any JSON object", a regex, a list of choices) becomes an
llguidance grammar once, on rank 0, where an unsupported schema feature is refused with the
library's own message. The grammar text travels with the request to every rank; each rank
runs its own matcher over the same sampled tokens, so all ranks compute the same token
bitmask before each sampling step, with no extra collective. JSON is compact (no free
whitespace): a grammar that allows whitespace anywhere lets a weak model write blanks
until max_tokens instead of closing the object.

llguidance was chosen by measurement (README, "Structured outputs"): a 3 MB wheel with no
dependencies, about 10 us per token for the mask of a 128k vocabulary on one CPU core,
explicit errors for the schema keywords it does not implement.
"""

from __future__ import annotations

import functools
import json

import llguidance
import llguidance.torch
import torch

from llama.tokenizer import Tokenizer

# Compact JSON: no whitespace between tokens, "," and ":" without spaces.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
ANY_JSON_OBJECT = {"type": "object"}


class GrammarError(ValueError):
    """A schema or pattern the grammar engine cannot constrain to (the message says why)."""


def json_schema_grammar(schema: dict) -> str:
    """The grammar of compact JSON validating against `schema`; GrammarError if unsupported."""
    return _checked(json.dumps(schema), "json")


def regex_grammar(pattern: str) -> str:
    return _checked(pattern, "regex")


def choice_grammar(choices: list[str]) -> str:
    return _checked(json.dumps(choices), "choice")


@functools.lru_cache(maxsize=256)
def _checked(text: str, kind: str) -> str:
    """Build and validate a grammar; cached, so a schema sent again costs a dictionary lookup."""
    try:
        if kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, overrides=COMPACT_JSON)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(text)
        else:
            grammar = llguidance.grammar_from("choice", text)
    except ValueError as e:
        raise GrammarError(str(e)) from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError("; ".join(m.strip() for m in messages))
    return grammar


@functools.lru_cache(maxsize=4)
def spells_any_text(tokenizer: Tokenizer) -> bool:
    """Whether the vocabulary can write every byte: Llama 3's byte-level BPE can, a sentencepiece
    model only with byte fallback (its 256 <0xNN> pieces). Without it a grammar can demand a
    character no piece holds ("{" in a vocabulary of plain words), and the mask is then empty."""
    if tokenizer.family == "llama3":
        return True
    sp = tokenizer._sp
    return sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256


@functools.lru_cache(maxsize=4)
def grammar_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary (built once per tokenizer: ~0.7 s for 128k tokens).
    The grammar's end is marked by EOS, which both chat and completion requests stop at."""
    if tokenizer.family == "llama3":
        from llguidance.tiktoken import lltokenizer_from_encoding

        return lltokenizer_from_encoding(tokenizer._tt, n_vocab=tokenizer.n_words, eos_token=tokenizer.eos_id)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_SentencePieceVocabulary(tokenizer)))


class _SentencePieceVocabulary:
    """A sentencepiece model as the bytes of each piece ("▁" is a space, <0xNN> a byte)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        sp = tokenizer._sp
        self._sp = sp
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(sp.vocab_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                self.tokens.append(bytes([int(piece[3:-1], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i):
                self.tokens.append(b"")
                self.special_token_ids.append(i)
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())

        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(self.tokens):
            if i not in self.special_token_ids:
                self._ids.setdefault(piece, i)

    def __call__(self, text: str) -> list[int]:
        """Pieces of `text` without sentencepiece's dummy leading space: the grammar engine
        tokenizes text it forces into the middle of an output."""
        text = text if isinstance(text, str) else text.decode()
        ids = self._sp.EncodeAsIds(text)
        if ids and not text[:1].isspace() and self.tokens[ids[0]].startswith(b" "):
            ids[:1] = self._pieces(self.tokens[ids[0]][1:].decode())
        return ids

    def _pieces(self, text: str) -> list[int]:
        """Ids spelling `text`: its own piece, else one per character (or per byte)."""
        if text.encode() in self._ids:
            return [self._ids[text.encode()]]
        ids = []
        for char in text:
            raw = char.encode()
            ids += [self._ids[raw]] if raw in self._ids else [self._ids[bytes([b])] for b in raw]
        return ids


class Matcher:
    """One request's grammar state on one rank: which tokens may come next."""

    def __init__(self, tokenizer: Tokenizer, grammar: str) -> None:
        self._matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer), grammar)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed tokens (bit t%32 of word t//32 set) into bitmask[row] (int32, CPU)."""
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def accept(self, token: int) -> None:
        self._matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The output is complete and nothing can extend it (or the matcher failed)."""
        return self._matcher.is_stopped()
