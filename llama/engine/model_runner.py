"""The model's forward passes over the paged cache, for the sequences a step schedules.

A prefill computes the new tokens of one or more sequences in one forward (their tokens one
after another), together with the decoding sequences' next tokens if any; a step with nothing
to prefill is a decode step, which computes one token for each decoding sequence, and only for
them: the batch is padded up to the next of a few sizes (1, 2, 4, ... max_num_seqs), so that a
compiled step (one CUDA graph on GPU) is made once per size, not once per batch. Padding rows
write to a scratch block outside the pool and are never sampled.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from llama.engine.sampler import CAN_ISOLATE
from llama.engine.sequence import Sequence
from llama.model import PagedBatch, Transformer

# A compiled decode forward: (model, tokens, batch) -> logits.
DecodeStep = Callable[[Transformer, torch.Tensor, PagedBatch], torch.Tensor]

# Models whose decode steps run compiled (see use_compiled_decode), with their compiled steps.
_COMPILED_DECODE: weakref.WeakKeyDictionary[Transformer, dict[tuple, DecodeStep]] = weakref.WeakKeyDictionary()


def use_compiled_decode(model: Transformer) -> None:
    """Run `model`'s decode steps (forward and sampling) through torch.compile in every engine
    from now on; prefill stays eager. A step's shapes depend only on its batch-size bucket (and,
    off CPU, the block table's width bucket), so it compiles once for each. CUDA graphs on GPU;
    inductor's C++ kernels on CPU."""
    _COMPILED_DECODE.setdefault(model, {})


def is_compiled(model: Transformer) -> bool:
    return model in _COMPILED_DECODE


def _decode(model: Transformer, tokens: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    return model.decode(tokens, batch)


def _compile_decode(device_type: str) -> DecodeStep:
    """A compiled decode step for one model, pool and shape (_COMPILED_DECODE keeps one for each).

    Before each call dynamo checks its guards, that nothing it traced has changed: on the
    model's modules that is about 4,000 guards, 1.7-2.9 ms a step of llama3.2-1b on CPU (its
    cache lookup, measured: a twentieth of an int4 step; CUDA graphs do not remove it). A loaded
    model's modules do not change, and each compiled function, with its own entries
    (isolate_recompiles), serves one model, pool and shape, so those guards are dropped (0.1 ms);
    the guards on the step's arguments stay."""
    cuda = device_type == "cuda"
    # On GPU, coordinate descent tuning (gpt-fast's setting) lets inductor generate the
    # products of a few rows as its own reductions, fused with int8 dequantization: measured on
    # an H200, one-row bf16 products read 3.5-4.1 TB/s against cuBLAS's 2.5-3.7, and int8
    # 1.7-3.0 TB/s against 0.65-0.72 for the unfused conversion, which writes a bf16 copy first.
    # The step's Python wrapper checks the size and strides of every custom operator's output
    # against its fake (81 checks a llama3.2-1b step): off, the wrapper's own time on CPU 1.6 ->
    # 1.2 ms a step (AMD EPYC Zen 4, int4, 2 threads: the compiled graph's self time in
    # tools/decode_step_profile.py). The operators' outputs are contiguous, as their fakes say
    # (llama.cpu_linear, llama.shm_collectives).
    options = {"triton.cudagraphs": cuda, "coordinate_descent_tuning": cuda, "size_asserts": False}
    if not CAN_ISOLATE:  # older torch: steps share one cache, told apart by guards
        return torch.compile(_decode, fullgraph=True, dynamic=False, options=options)
    options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    return torch.compile(_decode, fullgraph=True, dynamic=False, options=options, isolate_recompiles=True)


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


def batch_buckets(max_num_seqs: int) -> list[int]:
    """The decode batch sizes: powers of two below max_num_seqs, and max_num_seqs."""
    sizes = [1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs]
    return sizes + [max_num_seqs]


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_seq_len: int) -> None:
        self.model = model
        self.block_size = block_size
        self.scratch_block = num_blocks  # one block past the pool: where padding rows write
        model.setup_kv_cache(num_blocks + 1, block_size)
        self.device = model.output.weight.device
        self.buckets = batch_buckets(max_num_seqs)
        # On CPU the attention kernel reads a table only up to each position, so tables have
        # one width, the longest sequence's, and a compiled step one shape per batch size.
        # Elsewhere attention reads a table's whole width: it is cut to a power of two of blocks.
        self.max_width = -(-max_seq_len // block_size)
        self.fixed_width = self.device.type == "cpu"
        self.tables = torch.full((self.buckets[-1], self.max_width), self.scratch_block, dtype=torch.int64)
        self.compiled = _COMPILED_DECODE.get(model)

    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[Sequence, int]], sampled: list[Sequence],
                decoding: tuple[Sequence, ...] | list[Sequence] = ()) -> torch.Tensor:
        """Compute `n` new tokens of each (sequence, n) of chunks, and in the same forward the next
        token of each sequence in `decoding`: one pass over the weights serves both, so a prompt's
        chunk costs the running streams little more than their decode step. Returns logits for
        `decoding`, then for the sequences in `sampled` (those whose chunk reaches their end) at
        their last token, in that order; compiled, padded with rows up to a decode bucket, so
        that sampling compiles once per bucket."""
        tokens = [seq.token_ids[-1] for seq in decoding]
        positions = [seq.num_computed for seq in decoding]
        slots = [self._slot(seq, seq.num_computed) for seq in decoding]
        last = list(range(len(decoding)))
        query_lens, context_lens = [], []
        for seq, n in chunks:
            start = seq.num_computed
            span = range(start, start + n)
            tokens += seq.token_ids[start:start + n]
            positions += span
            slots += [self._slot(seq, p) for p in span]
            query_lens.append(n)
            context_lens.append(start + n)
            if seq in sampled:
                last.append(len(tokens) - 1)
        seqs = [*decoding, *(seq for seq, _ in chunks)]
        width = max(len(seq.block_table) for seq in seqs)
        tables = [seq.block_table + [self.scratch_block] * (width - len(seq.block_table)) for seq in seqs]
        inputs = torch.tensor([tokens, positions, slots], dtype=torch.int64).to(self.device)
        batch = PagedBatch(inputs[1], inputs[2], torch.tensor(tables, device=self.device), query_lens, context_lens,
                           decodes=len(decoding))
        logits = self.model.prefill(inputs[0], batch, torch.tensor(last, dtype=torch.int64, device=self.device))
        if self.compiled is None or not last:
            return logits
        rows = next(size for size in self.buckets if size >= len(last))
        return F.pad(logits, (0, 0, 0, rows - len(last)))

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each sequence (its last); returns logits (bucket rows >= len(seqs), vocab),
        row i for seqs[i]."""
        rows = next(size for size in self.buckets if size >= len(seqs))
        tokens, positions, slots = [0] * rows, [0] * rows, [self.scratch_block * self.block_size] * rows
        for i, seq in enumerate(seqs):
            tokens[i], positions[i] = seq.token_ids[-1], seq.num_computed
            slots[i] = self._slot(seq, seq.num_computed)
            self.tables[i, :len(seq.block_table)] = torch.tensor(seq.block_table)
        self.tables[len(seqs):rows, 0] = self.scratch_block
        width = self.max_width
        if not self.fixed_width:
            width = min(1 << (max(len(seq.block_table) for seq in seqs) - 1).bit_length(), self.max_width)
        inputs = torch.tensor([tokens, positions, slots], dtype=torch.int64).to(self.device)
        batch = PagedBatch(inputs[1], inputs[2], self.tables[:rows, :width].to(self.device))
        kernels = single_row_kernels(self.device) if rows == 1 else contextlib.nullcontext()
        with kernels:
            return self._decode_step(rows, width)(self.model, inputs[0], batch)

    def _decode_step(self, rows: int, width: int) -> DecodeStep:
        if self.compiled is None:
            return _decode
        key = (self.model.kv_cache_shape, rows, width)
        if key not in self.compiled:
            self.compiled[key] = _compile_decode(self.device.type)
        return self.compiled[key]

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
