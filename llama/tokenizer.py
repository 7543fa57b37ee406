"""Meta's two tokenizer formats behind one interface.

Llama 2 ships a sentencepiece model; Llama 3.x a tiktoken BPE file (base64 token, rank per
line) to which Meta appends 256 special tokens. The family is detected from the file.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from llama.errors import UserError

# Llama 3 pre-tokenization pattern and special tokens, as Meta defines them.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
LLAMA3_NUM_SPECIALS = 256
# tiktoken is fastest on pieces of bounded size; Meta splits long inputs the same way.
MAX_CHARS_PER_CALL = 400_000
MAX_RUN_WITHOUT_SPACE = 25_000

Family = Literal["llama2", "llama3"]


class Tokenizer:
    """encode/decode plus the ids generation needs: bos, eos, and the set that ends a completion."""

    family: Family
    n_words: int
    bos_id: int
    eos_id: int
    stop_ids: frozenset[int]

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--tokenizer_path {path}: file not found; pass the checkpoint's tokenizer.model")
        self.path = path
        if not self._load_sentencepiece() and not self._load_tiktoken():
            raise UserError(f"--tokenizer_path {path}: neither a sentencepiece model nor a Llama 3 tiktoken file")

    def _load_sentencepiece(self) -> bool:
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor()
        try:
            sp.Load(str(self.path))
        except (OSError, RuntimeError):
            return False
        self._sp, self.family = sp, "llama2"
        self.n_words, self.bos_id, self.eos_id = sp.vocab_size(), sp.bos_id(), sp.eos_id()
        self.stop_ids = frozenset({self.eos_id})
        return True

    def _load_tiktoken(self) -> bool:
        import tiktoken

        try:
            ranks = {
                base64.b64decode(token): int(rank)
                for token, rank in (line.split() for line in self.path.read_text().splitlines() if line)
            }
        except (ValueError, UnicodeDecodeError):
            return False
        if not ranks:
            return False
        reserved = [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + LLAMA3_NUM_SPECIALS - len(LLAMA3_NAMED_SPECIALS))]
        self.special_tokens = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_NAMED_SPECIALS + reserved)}
        self._tt = tiktoken.Encoding(name=self.path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self.family = "llama3"
        self.n_words = self._tt.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.stop_ids = frozenset({self.eos_id, self.special_tokens["<|eot_id|>"]})
        return True

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Special-token text in `text` is encoded as plain text, never as control tokens."""
        if self.family == "llama2":
            ids = self._sp.EncodeAsIds(text)
        else:
            ids = [
                i
                for start in range(0, len(text), MAX_CHARS_PER_CALL)
                for piece in _split_long_runs(text[start:start + MAX_CHARS_PER_CALL], MAX_RUN_WITHOUT_SPACE)
                for i in self._tt.encode(piece, allowed_special=set(), disallowed_special=())
            ]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        if self.family == "llama2":
            return self._sp.DecodeIds(list(ids))
        return self._tt.decode(list(ids))


def _split_long_runs(text: str, max_len: int) -> list[str]:
    """Cut `text` so no piece holds more than `max_len` consecutive spaces or non-spaces."""
    pieces, start, run, prev_space = [], 0, 0, None
    for i, ch in enumerate(text):
        space = ch.isspace()
        run = run + 1 if space == prev_space else 1
        prev_space = space
        if run > max_len:
            pieces.append(text[start:i])
            start, run = i, 1
    pieces.append(text[start:])
    return pieces
