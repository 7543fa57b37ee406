"""cpu_linear.c as it is here, or at --revision (B), against another git revision's (A), in one process: the products
of a decode step (every linear layer of a model's shape, fused as the kernels get them: wqkv, wo,
w13, w2 per layer, then the output), their weights streamed from memory, the two builds
alternating step by step. Wall time with --threads threads; medians of each side's GB/s and of
the per-pair ratios (B's time / A's), with their quartiles (the noise). The memory read ceiling
(cpu_linear.read_memory) of the same bytes is printed beside them: on a shared host it moves
from minute to minute, which is why only the ratio of one run counts. Quantized products of more
rows than cpu_linear.QUANTIZED_FEW_ROWS (a prefill's) multiply dequantized tiles, as the model's
do, and their tokens per second are printed too.

With --attention_positions, the decode attention instead (decode_attention, the model shape's
heads, one sequence, a bfloat16 cache of that many positions in shuffled blocks), the caches
emptied before each call by reading a buffer larger than them, as a layer's weights do between
two of its attention calls: the medians of each side's times and of the ratios, per length.

    python3 tools/cpu_kernels_revisions_ab.py --baseline main --quantize int4 [--rows 1] [--threads 2]
    python3 tools/cpu_kernels_revisions_ab.py --baseline 8049c09^ --revision 8049c09 --quantize bf16
    python3 tools/cpu_kernels_revisions_ab.py --baseline main --attention_positions 128,1024
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as python3 tools/...

from llama import benchmarking as bench  # noqa: E402
from llama import cpu_linear, quantize  # noqa: E402


def layer_shapes(shape: str) -> list[tuple[int, int]]:
    """(out, in) of each product of a decode step, in order: a layer's weights as
    quantize.pack_for_device fuses them, then the output."""
    args = bench.random_model_args(shape, None, 1, "bfloat16")
    weights = args.weight_shapes()
    layer = []
    for prefix, names in (("attention", quantize.FUSED["wqkv"]), ("attention", ("wo",)),
                          ("feed_forward", quantize.FUSED["w13"]), ("feed_forward", ("w2",))):
        parts = [weights[f"layers.0.{prefix}.{name}.weight"] for name in names]
        layer.append((sum(rows for rows, _ in parts), parts[0][1]))
    return layer * args.n_layers + [weights["output.weight"]]


def prefill_tiles(fmt: str, rows: int) -> bool:
    """Whether the model multiplies dequantized tiles for these rows (a prefill's), not a kernel."""
    return fmt != "bf16" and rows > cpu_linear.QUANTIZED_FEW_ROWS


def product(fmt: str, n: int, k: int, rows: int, group: int, threads: int) -> tuple[Callable[[ctypes.CDLL], int], int]:
    """A call of either build's kernel on random operands of this shape, and the weight's bytes."""
    x, y = torch.randn(rows, k, dtype=torch.bfloat16), torch.empty(rows, n, dtype=torch.bfloat16)
    isa = cpu_linear._bf16_isa() if fmt == "bf16" else cpu_linear._quantized_isa()
    if fmt == "bf16":
        w = torch.randn(n, k, dtype=torch.bfloat16)
        return (lambda lib: lib.bf16_linear(x.data_ptr(), rows, k, w.data_ptr(), k, n, y.data_ptr(), threads, isa),
                w.numel() * 2)
    if fmt == "int8":
        w, s = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.full((n,), 1e-3, dtype=torch.bfloat16)
    else:
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
        s = torch.full((n, k // group, 2), 1e-3, dtype=torch.bfloat16)
    group = group if fmt == "int4" else 0
    if prefill_tiles(fmt, rows):  # GEMMs of dequantized tiles, as _quantized_linear's
        tiles = x if cpu_linear._native_bf16_tiles() else x.float()

        def gemm(lib: ctypes.CDLL) -> None:
            cpu_linear._blocked_gemm(tiles, n, k, lambda block, start, stop: lib.dequantize_rows(
                w.data_ptr(), w.stride(0), s.data_ptr(), 1, group, k, start, stop, block.data_ptr(),
                block.dtype == torch.bfloat16, threads, cpu_linear._bf16_isa()))
        return gemm, w.numel() + s.numel() * 2
    return (lambda lib: lib.quantized_linear(x.data_ptr(), rows, k, 1, w.data_ptr(), w.stride(0), s.data_ptr(), 1,
                                             group, n, y.data_ptr(), threads, isa),
            w.numel() + s.numel() * 2)


def attention(shape: str, positions: int, threads: int) -> Callable[[ctypes.CDLL], int]:
    """A call of either build's decode attention over `positions` cached positions (16 a block,
    the blocks shuffled in a pool of twice as many)."""
    args = bench.random_model_args(shape, None, 1, "bfloat16")
    heads, kv_heads, dim, block = args.n_heads, args.n_kv_heads, args.head_dim, 16
    width = -(-positions // block)
    k, v = (torch.randn(2 * width, kv_heads, block, dim, dtype=torch.bfloat16) for _ in range(2))
    q, out = torch.randn(1, heads, 1, dim, dtype=torch.bfloat16), torch.empty(1, heads, 1, dim, dtype=torch.bfloat16)
    tables = torch.randperm(2 * width)[:width].view(1, width).contiguous()
    last = torch.tensor([positions - 1])
    return lambda lib: lib.decode_attention(q.data_ptr(), 1, k.data_ptr(), v.data_ptr(), 1, 1, heads, kv_heads, block,
                                            dim, last.data_ptr(), tables.data_ptr(), width, dim**-0.5,
                                            out.data_ptr(), threads, cpu_linear._bf16_isa())


def compare_attention(args: argparse.Namespace, libs: tuple[ctypes.CDLL, ...]) -> None:
    evict = torch.ones(64 << 20, dtype=torch.uint8)  # more than the L2 and L3 caches hold
    for positions in (int(n) for n in args.attention_positions.split(",")):
        call = attention(args.shape, positions, args.threads)
        times: list[list[float]] = [[], []]
        for i in range(2 * args.pairs):
            for side in (0, 1) if i % 2 == 0 else (1, 0):
                cpu_linear.read_memory(evict)
                start = time.perf_counter()
                call(libs[side])
                times[side].append(time.perf_counter() - start)
        ratios = sorted(b / a for a, b in zip(*times))
        a, b = (1e6 * statistics.median(t) for t in times)
        print(f"{args.shape} decode attention, {positions} positions, {args.threads} thread(s), caches emptied before "
              f"each call: A ({args.baseline}) {a:.1f} us, B ({args.revision or 'here'}) {b:.1f} us; B's time / A's "
              f"{statistics.median(ratios):.3f} (quartiles {ratios[len(ratios) // 4]:.3f}-"
              f"{ratios[3 * len(ratios) // 4]:.3f})")


def load_revision(revision: str, tmp: Path) -> ctypes.CDLL | None:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:llama/cpu_linear.c"],
                            capture_output=True, check=True).stdout
    path = tmp / revision.replace("/", "_") / "cpu_linear.c"
    path.parent.mkdir()
    path.write_bytes(source)
    return cpu_linear.load_library(path)

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="HEAD", help="the git revision whose llama/cpu_linear.c is A")
    p.add_argument("--revision", help="the git revision whose llama/cpu_linear.c is B (default: this checkout's file)")
    p.add_argument("--quantize", default="int4", choices=["bf16", "int8", "int4"])
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--shape", default="llama3.2-1b", choices=sorted(bench.SHAPES))
    p.add_argument("--rows", type=int, default=1, help="activation rows (the decode batch)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=15)
    p.add_argument("--attention_positions", help="comma-separated cache lengths: time the decode attention instead")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        libs = (load_revision(args.baseline, Path(tmp)),
                load_revision(args.revision, Path(tmp)) if args.revision else cpu_linear._library())
    if None in libs:
        sys.exit("cpu_linear.c did not build here")
    if args.attention_positions:
        compare_attention(args, libs)
        return
    calls, nbytes = zip(*(product(args.quantize, n, k, args.rows, args.group_size, args.threads)
                          for n, k in layer_shapes(args.shape)))
    total = sum(nbytes)
    copy = torch.ones(total, dtype=torch.uint8)  # the ceiling reads as many bytes (written: not the zero page)

    def step(side: int) -> float:
        start = time.perf_counter()
        if side == 2:
            cpu_linear.read_memory(copy)
        else:
            for call in calls:
                call(libs[side])
        return time.perf_counter() - start

    times: list[list[float]] = [[], [], []]
    for side in (0, 1, 2):
        step(side)
    for i in range(args.pairs):
        for side in (0, 1, 2) if i % 2 == 0 else (1, 0, 2):
            times[side].append(step(side))
    ratios = sorted(b / a for a, b in zip(times[0], times[1]))
    rate = [total / statistics.median(t) / 1e9 for t in times]
    prefill = prefill_tiles(args.quantize, args.rows)
    if prefill:
        print(f"prefill tokens/s: A {args.rows / statistics.median(times[0]):.1f}, "
              f"B {args.rows / statistics.median(times[1]):.1f}")
    print(f"{args.shape} {args.quantize} {'prefill' if prefill else 'decode'} products, {args.rows} row(s), "
          f"{args.threads} thread(s), "
          f"{total / 1e6:.0f} MB a step: A ({args.baseline}) {rate[0]:.1f} GB/s, B ({args.revision or 'here'}) "
          f"{rate[1]:.1f} GB/s, "
          f"read ceiling {rate[2]:.1f} GB/s ({min(total / t / 1e9 for t in times[2]):.1f}-"
          f"{max(total / t / 1e9 for t in times[2]):.1f}); B's time / A's {statistics.median(ratios):.3f} "
          f"(quartiles {ratios[len(ratios) // 4]:.3f}-{ratios[3 * len(ratios) // 4]:.3f})")


if __name__ == "__main__":
    main()
