"""What a step costs while a long prompt is prefilled beside running streams: the engine's one
forward for the streams' decode tokens and the prompt's chunk together, against the two
forwards it would otherwise take (a decode step, then the chunk), alternated in one process.
One thread, timed by its CPU time (on a shared machine wall time mostly measures the neighbours).

    python3 tools/mixed_step_cost.py --random_weights llama3.2-1b --streams 4 --chunk 16 [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as python3 tools/...

from llama import benchmarking as bench  # noqa: E402
from llama.distributed import init_runtime  # noqa: E402
from llama.engine import Engine, EngineConfig, Request, SamplingParams, use_compiled_decode  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random_weights", default="llama3.2-1b", choices=sorted(bench.SHAPES))
    p.add_argument("--streams", type=int, default=4, help="sequences decoding")
    p.add_argument("--chunk", type=int, default=16, help="prompt tokens a step prefills")
    p.add_argument("--pairs", type=int, default=9)
    p.add_argument("--compile", action="store_true", help="decode steps compiled, as serve.py --compile")
    args = p.parse_args()
    torch.set_num_threads(1)
    runtime = init_runtime(use_gpus=False)
    model = bench.build_random_model(bench.random_model_args(args.random_weights, 4096, args.streams + 1,
                                                             "bfloat16"), runtime, torch.bfloat16)
    if args.compile:
        use_compiled_decode(model)
    engine = Engine(model, EngineConfig(prefill_chunk=args.chunk))
    greedy = SamplingParams(temperature=0.0)
    for i in range(args.streams):
        engine.submit(Request(i, list(range(1 + i, 17 + i)), 1000, frozenset(), greedy))
    while engine.scheduler.waiting or any(seq.num_uncomputed > 1 for seq in engine.scheduler.running):
        engine.step()
    engine.submit(Request(args.streams, list(range(1, 2049)), 1, frozenset(), greedy))
    plan = engine.scheduler.schedule()  # the streams' next tokens and the prompt's first chunk
    assert len(plan.decode) == args.streams and [n for _, n in plan.prefill] == [args.chunk]
    runner = engine.runner

    def one_forward() -> None:
        runner.prefill(plan.prefill, [], plan.decode)

    def two_forwards() -> None:
        runner.decode(plan.decode)
        runner.prefill(plan.prefill, [])

    def timed(step) -> float:  # computing the same tokens again writes the same cache entries
        start = time.thread_time()
        step()
        return time.thread_time() - start

    timed(one_forward), timed(two_forwards), timed(two_forwards)  # warm-up (and compilation)
    one, two = [], []
    for i in range(args.pairs):
        for step, times in ((one_forward, one), (two_forwards, two))[::1 if i % 2 == 0 else -1]:
            times.append(timed(step))
    ratios = sorted(a / b for a, b in zip(one, two))
    print(f"{args.random_weights} bf16, {args.streams} streams decoding beside a {args.chunk}-token chunk, "
          f"{'compiled' if args.compile else 'eager'} decode, 1 thread, CPU time, {args.pairs} pairs:")
    print(f"  one forward {statistics.median(one) * 1e3:.0f} ms, two forwards {statistics.median(two) * 1e3:.0f} ms: "
          f"{statistics.median(ratios):.2f}x (quartiles {ratios[len(ratios) // 4]:.2f}-"
          f"{ratios[3 * len(ratios) // 4]:.2f})")


if __name__ == "__main__":
    main()
