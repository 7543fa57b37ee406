"""The pool of KV cache blocks: which block holds what, who uses it, and the prefix cache.

Every full block of computed tokens is keyed by a hash of the whole prefix up to its end (its
parent's key and its own tokens), so two sequences that begin with the same tokens map them to
the same blocks: a new sequence takes the blocks of its longest cached prefix instead of
computing them (reference-counted, no copy; a shared block is full and never written again).
A block nobody uses any more keeps its contents and key until its room is needed: free blocks
are reused least recently freed first, and a hit on one takes it back. Every rank holds the
same manager fed with the same sequences, so all make the same choices.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from llama.engine.sequence import Sequence


@dataclass(eq=False)
class Block:
    id: int
    ref_count: int = 0
    key: int | None = None  # the prefix hash of a full, computed block
    tokens: tuple[int, ...] = ()  # its tokens, to tell a hash collision from a hit


def prefix_key(parent: int | None, tokens: tuple[int, ...]) -> int:
    """The key of a block: its tokens and (through the parent's key) every token before them.
    Python's hash of integers is the same in every process."""
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unused blocks, the next to be reused first: those without contents worth keeping,
        # then cached ones, least recently freed first.
        self.free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # prefix key -> block
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of them, found there

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The blocks that already hold seq's longest cached prefix of full blocks. The last token
        is left out, so at least one token is computed (its logits give the next token)."""
        if not self.prefix_caching:
            return []
        found, key = [], None
        size = self.block_size
        for start in range(0, len(seq.token_ids) - size, size):
            tokens = tuple(seq.token_ids[start:start + size])
            key = prefix_key(key, tokens)
            block = self.cached.get(key)
            if block is None or self.blocks[block].tokens != tokens:
                break
            found.append(block)
        return found

    def can_admit(self, prefix: list[int], tokens: int) -> bool:
        """Whether a sequence that takes the cached blocks `prefix` finds room for `tokens` in all."""
        idle_hits = sum(self.blocks[b].ref_count == 0 for b in prefix)
        return self.blocks_for(tokens) - len(prefix) <= self.num_free - idle_hits

    def admit(self, seq: Sequence, prefix: list[int]) -> None:
        """Give seq the blocks of its cached prefix; they count as computed."""
        for block in prefix:
            if self.blocks[block].ref_count == 0:
                del self.free[block]
            self.blocks[block].ref_count += 1
        seq.block_table = list(prefix)
        seq.num_computed = len(prefix) * self.block_size
        seq.num_keyed = len(prefix)
        if self.prefix_caching:
            self.queried_tokens += len(seq.token_ids)
            self.hit_tokens += seq.num_computed

    def grow(self, seq: Sequence, tokens: int) -> bool:
        """Add blocks until seq's table holds `tokens` tokens; False (and nothing added) if the
        pool has too few free."""
        needed = self.blocks_for(tokens) - len(seq.block_table)
        if needed > self.num_free:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take())
        return True

    def release(self, seq: Sequence) -> None:
        """Return seq's blocks. Its last blocks go first in the reuse order, so a prefix is
        evicted from its end, and a block without a key (partly filled) before any cached one."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.key is None:
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed = seq.num_keyed = 0

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Key seq's blocks that became full and computed, so later sequences can share them."""
        if not self.prefix_caching:
            return
        size = self.block_size
        for i in range(seq.num_keyed, seq.num_computed // size):
            block = self.blocks[seq.block_table[i]]
            parent = self.blocks[seq.block_table[i - 1]].key if i else None
            block.tokens = tuple(seq.token_ids[i * size:(i + 1) * size])
            block.key = prefix_key(parent, block.tokens)
            self.cached.setdefault(block.key, block.id)  # the first of equal blocks is the one shared
        seq.num_keyed = max(seq.num_keyed, seq.num_computed // size)

    def _take(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None and self.cached.get(block.key) == block_id:
            del self.cached[block.key]
        block.key, block.tokens, block.ref_count = None, (), 1
        return block_id
