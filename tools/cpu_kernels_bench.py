"""cpu_linear.c's products by instruction set, against each other and torch's own kernels.

On a shared machine wall time mostly measures the neighbours; this times each call by the CPU
time of the calling thread (time.thread_time), with one thread and weights that stay in cache,
so what is compared is the work each kernel does (its compute rate; streaming from memory is
the benchmark's business). A and B alternate call by call; the medians of the per-pair ratios
are printed with their quartiles (the noise). Rates are of the weight's bytes (decode) or GFLOP
(prefill).

    python3 tools/cpu_kernels_bench.py            # decode: bf16, int8, int4 at 1, 2 and 4 rows
    python3 tools/cpu_kernels_bench.py --prefill  # 128 rows: bf16 tiles vs float32 tiles and torch's
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as python3 tools/...

from llama import cpu_linear, quantize  # noqa: E402

AVX2, AVX512 = cpu_linear.ISA_AVX2, cpu_linear.ISA_AVX512


def compare(label: str, a: Callable[[], object], b: Callable[[], object], amount: float, unit: str, pairs: int,
            calls: int) -> None:
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(pairs):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.thread_time()
            for _ in range(calls):
                (a, b)[side]()
            times[side].append((time.thread_time() - start) / calls)
    ratios = sorted(tb / ta for ta, tb in zip(*times))
    rate_a, rate_b = (amount / statistics.median(t) / 1e9 for t in times)
    print(f"{label}: {rate_a:.1f} vs {rate_b:.1f} {unit}, A {statistics.median(ratios):.2f}x as fast "
          f"(quartiles {ratios[len(ratios) // 4]:.2f}-{ratios[3 * len(ratios) // 4]:.2f})", flush=True)


def torchs(scheme: quantize.Scheme, stored: dict[str, torch.Tensor], n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The product through torch's own int8/int4 CPU kernels (what runs without a C compiler)."""
    uses = quantize._uses_cpu_linear
    quantize._uses_cpu_linear = lambda w: False
    try:
        operands = quantize.kernel_operands(scheme, stored["weight"], stored["scales"], stored.get("zeros"),
                                            torch.bfloat16)
    finally:
        quantize._uses_cpu_linear = uses

    def product(x: torch.Tensor) -> torch.Tensor:
        quantize._uses_cpu_linear = lambda w: False
        try:
            return quantize.linear(x, scheme, n, *operands)
        finally:
            quantize._uses_cpu_linear = uses
    return product


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefill", action="store_true", help="products of 128 rows instead of decode's few")
    p.add_argument("--pairs", type=int, default=21)
    args = p.parse_args()
    torch.set_num_threads(1)
    n, k = (2048, 2048) if args.prefill else (512, 2048)  # in cache (bf16: 8 and 2 MiB)
    weight = torch.randn(n, k) * 0.02
    print(f"{n} x {k} weights, 1 thread, CPU time; here: bf16 kernel {cpu_linear._bf16_isa()}, int8/int4 "
          f"{cpu_linear._quantized_isa()} (1 = AVX-512), native bf16 {cpu_linear.NATIVE_BF16}", flush=True)
    schemes = [quantize.Scheme("int8"), quantize.Scheme("int4", 128), quantize.Scheme("int4", 32)]
    if args.prefill:
        x = torch.randn(128, k).bfloat16()
        for scheme in schemes:
            stored = quantize.quantize(weight, scheme, torch.bfloat16)
            ours = quantize.kernel_operands(scheme, stored["weight"], stored["scales"], stored.get("zeros"),
                                            torch.bfloat16)
            group = scheme.group_size or 0
            tiles = lambda: cpu_linear._quantized_linear(x, *ours, group, AVX512)  # noqa: E731
            compare(f"{scheme.describe()} 128 rows: bf16 tiles vs float32 tiles", tiles,
                    lambda: cpu_linear._quantized_linear(x, *ours, group, AVX2), 2 * 128 * n * k, "GFLOP/s",
                    args.pairs, 1)
            theirs = torchs(scheme, stored, n)
            compare(f"{scheme.describe()} 128 rows: bf16 tiles vs torch's kernel", tiles, lambda: theirs(x),
                    2 * 128 * n * k, "GFLOP/s", args.pairs, 1)
        return
    w16 = weight.bfloat16()
    for rows in (1, 2, 4):
        x = torch.randn(rows, k).bfloat16()
        ours = lambda: cpu_linear._bf16_kernel(x, w16, AVX512)  # noqa: E731
        compare(f"bf16 {rows} rows: AVX-512 vs AVX2 kernel", ours, lambda: cpu_linear._bf16_kernel(x, w16, AVX2),
                w16.numel() * 2, "GB/s", args.pairs, 20)
        with torch.backends.mkldnn.flags(enabled=rows > 1):  # as decode runs it (oneDNN from 2 rows)
            compare(f"bf16 {rows} rows: AVX-512 kernel vs torch's ({'oneDNN' if rows > 1 else 'ATen'})", ours,
                    lambda: F.linear(x, w16), w16.numel() * 2, "GB/s", args.pairs, 20)
        for scheme in schemes:
            stored = quantize.quantize(weight, scheme, torch.bfloat16)
            operands = quantize.kernel_operands(scheme, stored["weight"], stored["scales"], stored.get("zeros"),
                                                torch.bfloat16)
            group, nbytes = scheme.group_size or 0, operands[0].numel()
            vnni = lambda: cpu_linear._quantized_linear(x, *operands, group, AVX512)  # noqa: E731
            compare(f"{scheme.describe()} {rows} rows: AVX-512 VNNI vs AVX2 kernel", vnni,
                    lambda: cpu_linear._quantized_linear(x, *operands, group, AVX2), nbytes, "GB/s", args.pairs, 20)
            theirs = torchs(scheme, stored, n)
            compare(f"{scheme.describe()} {rows} rows: AVX-512 VNNI kernel vs torch's", vnni, lambda: theirs(x),
                    nbytes, "GB/s", args.pairs, 20)


if __name__ == "__main__":
    main()
