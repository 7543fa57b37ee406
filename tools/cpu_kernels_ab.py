"""A/B of cpu_linear.c's instruction sets on whole generate() runs of a random-weight model, in
one process: the runs alternate between TP_LLAMA_CPU_ISA=avx2 and the CPU's widest kernels (eager
mode, where the choice is read at each product), and the medians of the per-pair ratios of
decode step time and of prefill time are printed, with their quartiles (the noise).

    python3 tools/cpu_kernels_ab.py --random_weights llama3.2-1b --quantize int4 --pairs 9
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from llama import benchmarking as bench
from llama import cpu_linear, quantize
from llama.distributed import init_runtime


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
    p.add_argument("--gen_len", type=int, default=32)
    p.add_argument("--pairs", type=int, default=7)
    args = p.parse_args()
    runtime = init_runtime(use_gpus=False)
    model_args = bench.random_model_args(args.random_weights, args.prompt_len + args.gen_len, 1, "bfloat16")
    if args.quantize != "none":
        model_args.quantize = args.quantize
        model_args.group_size = args.group_size if args.quantize == "int4" else None
    model = bench.build_random_model(model_args, runtime, torch.bfloat16)
    prompt = [list(range(1, args.prompt_len + 1))]

    def run(isa: str) -> tuple[float, float]:
        choose(isa)
        trial = bench.time_generate(model, prompt, args.gen_len)
        return trial.ttft_s, statistics.median(trial.step_s)

    run("avx2"), run("avx512")  # warm-up
    times = {"avx2": [], "avx512": []}
    for i in range(args.pairs):
        for isa in ("avx2", "avx512") if i % 2 == 0 else ("avx512", "avx2"):
            times[isa].append(run(isa))
    print(f"{args.random_weights} {args.quantize}, {torch.get_num_threads()} threads, "
          f"kernels: bf16 {cpu_linear._bf16_isa()}, int8/int4 {cpu_linear._quantized_isa()} (1 = AVX-512)")
    for what, index in (("prefill", 0), ("decode step", 1)):
        ratios = sorted(a[index] / b[index] for a, b in zip(times["avx2"], times["avx512"]))
        a2 = statistics.median(t[index] for t in times["avx2"]) * 1e3
        a5 = statistics.median(t[index] for t in times["avx512"]) * 1e3
        print(f"  {what}: avx2 {a2:.1f} ms, avx512 {a5:.1f} ms; avx512 faster by {statistics.median(ratios):.3f}x "
              f"(quartiles {ratios[len(ratios) // 4]:.3f}-{ratios[3 * len(ratios) // 4]:.3f}, {len(ratios)} pairs)")


if __name__ == "__main__":
    main()
