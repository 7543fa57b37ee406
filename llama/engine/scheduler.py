"""Which sequences each step computes, and how many of their tokens.

A step decodes every running sequence that has a token to sample (one token each), and spends
up to `prefill_chunk` tokens prefilling: first sequences whose prompt is partly computed, oldest
first, then waiting ones, first come first served, while the pool has room. A long prompt is so
prefilled a chunk a step while the others keep decoding. When a decoding sequence needs a new
block and none is free, the youngest running sequence is preempted: its blocks are released and
it waits, first in line, to be computed again (what it generated stays: recomputing it gives the
same cache). A sequence alone in the pool that outgrows it ends there ("length").
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from llama.engine.block_manager import BlockManager
from llama.engine.sequence import Sequence, Status


@dataclass
class Schedule:
    decode: list[Sequence] = field(default_factory=list)  # one token each
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    out_of_room: list[Sequence] = field(default_factory=list)  # could not grow with the pool all theirs
    preempted: list[Sequence] = field(default_factory=list)  # back to waiting, to be recomputed


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, prefill_chunk: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = prefill_chunk
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in order of admission: the last is the youngest
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget seq (finished or cancelled) and release its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.blocks.release(seq)
        else:
            self.waiting.remove(seq)

    def schedule(self) -> Schedule:
        plan = Schedule()
        for seq in list(self.running):
            if seq.status is Status.RUNNING and seq.num_uncomputed == 1 and self._make_room(seq, plan):
                plan.decode.append(seq)
        budget = self.prefill_chunk
        for seq in self.running:
            if budget and seq.num_uncomputed > 1:
                room = (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size - seq.num_computed
                n = min(seq.num_uncomputed, budget, room)
                if n > 0:
                    self.blocks.grow(seq, seq.num_computed + n)
                    plan.prefill.append((seq, n))
                    budget -= n
        while budget and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._prefilling_same_start(seq):
                break  # it takes those blocks from the prefix cache once they are computed
            prefix = self.blocks.cached_prefix(seq)
            n = min(len(seq.token_ids) - len(prefix) * self.blocks.block_size, budget)
            if not self.blocks.can_admit(prefix, len(prefix) * self.blocks.block_size + n):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, prefix)
            self.blocks.grow(seq, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.prefill.append((seq, n))
            budget -= n
        if not plan.decode and not plan.prefill and len(self.running) > 1:
            # Every running sequence is mid-prompt and the pool is full: let the oldest go on.
            self._preempt(self.running[-1], plan)
            retry = self.schedule()
            retry.preempted[:0] = plan.preempted
            return retry
        return plan

    def _prefilling_same_start(self, seq: Sequence) -> bool:
        """Whether a running sequence is still prefilling the same first block as seq (the n
        completions of one prompt, sent together): seq waits for its blocks instead of computing
        the same prompt again."""
        size = self.blocks.block_size
        start = seq.token_ids[:size]
        return (self.blocks.prefix_caching and len(start) == size
                and any(s.num_uncomputed > 1 and s.token_ids[:size] == start for s in self.running))

    def _make_room(self, seq: Sequence, plan: Schedule) -> bool:
        """A block for seq's next token, preempting the youngest sequences if need be; False if
        seq itself was preempted, or is alone and out of room."""
        while not self.blocks.grow(seq, seq.num_computed + 1):
            if self.running == [seq]:
                plan.out_of_room.append(seq)
                return False
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, plan: Schedule) -> None:
        plan.preempted.append(seq)
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1
