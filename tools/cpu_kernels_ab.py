"""A/B of cpu_linear.c's instruction sets on whole generate() runs of a random-weight model, in
one process: runs alternate between TP_LLAMA_CPU_ISA=avx2 and the CPU's widest kernels (eager
mode, where the choice is read at each product), and the medians of the per-pair ratios of the
prefill's and of a decode step's time are printed with their quartiles (the noise).

--cpu_time runs one thread and times by the thread's CPU time: on a shared, loaded machine wall
time mostly measures the neighbours, while CPU time measures the work (memory stalls included).

    python3 tools/cpu_kernels_ab.py --random_weights llama3.2-1b --quantize int4 --pairs 5 [--cpu_time]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as python3 tools/...

from llama import benchmarking as bench  # noqa: E402
from llama import cpu_linear, quantize  # noqa: E402
from llama.distributed import init_runtime  # noqa: E402
from llama.engine import generate  # noqa: E402


def choose(isa: str) -> None:
    os.environ[cpu_linear.ISA_VARIABLE] = isa
    for choice in (cpu_linear._bf16_isa, cpu_linear._quantized_isa):
        choice.cache_clear()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random_weights", default="llama3.2-1b", choices=sorted(bench.SHAPES))
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--group_size", type=int, default=quantize.DEFAULT_GROUP_SIZE)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--gen_len", type=int, default=16)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--cpu_time", action="store_true", help="one thread, timed by its CPU time")
    args = p.parse_args()
    if args.cpu_time:
        torch.set_num_threads(1)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    runtime = init_runtime(use_gpus=False)
    model_args = bench.random_model_args(args.random_weights, args.prompt_len + args.gen_len + 1, 1, "bfloat16")
    if args.quantize != "none":
        model_args.quantize = args.quantize
        model_args.group_size = args.group_size if args.quantize == "int4" else None
    model = bench.build_random_model(model_args, runtime, torch.bfloat16)
    prompt = [list(range(1, args.prompt_len + 1))]

    def timed(gen_len: int) -> float:
        engine = bench.engine_for(model, bench.Config(1, args.prompt_len, gen_len))  # prefix cache empty
        start = clock()
        generate(engine, prompt, gen_len, stop_ids=frozenset(), temperature=0.0)
        return clock() - start

    def run(isa: str) -> tuple[float, float]:
        """Seconds of the prefill (with its first token) and of one decode step."""
        choose(isa)
        prefill = timed(1)
        return prefill, (timed(1 + args.gen_len) - prefill) / args.gen_len

    run("avx2"), run("avx512")  # warm-up
    times: dict[str, list[tuple[float, float]]] = {"avx2": [], "avx512": []}
    for i in range(args.pairs):
        for isa in ("avx2", "avx512") if i % 2 == 0 else ("avx512", "avx2"):
            times[isa].append(run(isa))
    print(f"{args.random_weights} {args.quantize}, {torch.get_num_threads()} thread(s), "
          f"{'CPU' if args.cpu_time else 'wall'} time; kernels: bf16 {cpu_linear._bf16_isa()}, int8/int4 "
          f"{cpu_linear._quantized_isa()} (1 = AVX-512), native bf16 {cpu_linear.NATIVE_BF16}")
    for what, index in (("prefill", 0), ("decode step", 1)):
        ratios = sorted(a[index] / b[index] for a, b in zip(times["avx2"], times["avx512"]))
        avx2, avx512 = (statistics.median(t[index] for t in times[isa]) * 1e3 for isa in ("avx2", "avx512"))
        print(f"  {what}: avx2 {avx2:.1f} ms, avx512 {avx512:.1f} ms; avx512 {statistics.median(ratios):.2f}x as fast "
              f"(quartiles {ratios[len(ratios) // 4]:.2f}-{ratios[3 * len(ratios) // 4]:.2f}, {len(ratios)} pairs)",
              flush=True)


if __name__ == "__main__":
    main()
