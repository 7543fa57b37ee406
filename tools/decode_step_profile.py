"""Where a compiled decode step's time goes on CPU: a random-weight model's engine decodes one
sequence, the median wall time of its steps is printed, then torch.profiler's table of ten steps
(the products are tp_llama::quantized_rows / bf16_rows, the attention tp_llama::decode_attention,
the rest of the step the compiled graph's own time).

With --ab_python_operators, no profile: a second model's steps, compiled as where cpu_ops.cpp
does not build (the kernels called through the Python kernels of tp_llama::quantized_linear /
bf16_linear / decode_attention), alternate with the first's, and the medians of both and of the
ratios of neighbouring steps are printed.

    python3 tools/decode_step_profile.py --quantize int4 [--threads 2] [--prompt_len 128] [--ab_python_operators]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as python3 tools/...

from llama import benchmarking as bench  # noqa: E402
from llama import cpu_linear, quantize  # noqa: E402
from llama.distributed import init_runtime  # noqa: E402
from llama.engine import Engine, EngineConfig, Request, SamplingParams, use_compiled_decode  # noqa: E402


def decoding_engine(args: argparse.Namespace, runtime, python_operators: bool = False) -> Engine:
    """An engine of a new random model, its prompt prefilled and its decode step compiled."""
    model_args = bench.random_model_args(args.random_weights, 4096, 1, "bfloat16")
    if args.quantize != "none":
        model_args.quantize = args.quantize
        model_args.group_size = quantize.DEFAULT_GROUP_SIZE if args.quantize == "int4" else None
    model = bench.build_random_model(model_args, runtime, torch.bfloat16)
    use_compiled_decode(model)
    engine = Engine(model, EngineConfig())
    prompt = list(range(1, args.prompt_len + 1))
    engine.submit(Request(0, prompt, 100_000, frozenset(), SamplingParams(temperature=0.0)))
    built = cpu_linear._has_torch_operators
    if python_operators:  # read while the step compiles (a constant to it), so this model's step keeps it
        cpu_linear._has_torch_operators = lambda: False
    try:
        for _ in range(20):  # the prefill, compilation, warm-up
            engine.step()
    finally:
        cpu_linear._has_torch_operators = built
    return engine


def timed_step(engine: Engine) -> float:
    start = time.perf_counter()
    engine.step()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random_weights", default="llama3.2-1b", choices=sorted(bench.SHAPES))
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--ab_python_operators", action="store_true")
    p.add_argument("--steps", type=int, default=30, help="timed steps (of each, with --ab_python_operators)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runtime = init_runtime(use_gpus=False)
    engine = decoding_engine(args, runtime)
    label = f"{args.random_weights} {args.quantize}, {args.threads} threads"
    if args.ab_python_operators:
        if not cpu_linear.has_torch_operators():
            sys.exit("cpu_ops.cpp did not build here: there is nothing to compare")
        baseline = decoding_engine(args, runtime, python_operators=True)
        pairs = [(timed_step(baseline), timed_step(engine)) for _ in range(args.steps)]
        ratios = [b / a for a, b in pairs]
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        print(f"{label}: decode step median {statistics.median(b for a, b in pairs) * 1e3:.2f} ms with the C++ "
              f"operators, {statistics.median(a for a, b in pairs) * 1e3:.2f} ms through Python; time / Python's "
              f"{median:.3f} (quartiles {q1:.3f}-{q3:.3f})")
        return
    times = [timed_step(engine) for _ in range(args.steps)]
    print(f"{label}: decode step median {statistics.median(times) * 1e3:.2f} ms (fastest {min(times) * 1e3:.2f})")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
