"""Where a compiled decode step's time goes on CPU: a random-weight model's engine decodes one
sequence, the median wall time of its steps is printed, then torch.profiler's table of ten steps
(the products are tp_llama::quantized_linear / bf16_linear, the attention
tp_llama::decode_attention, the rest of the step the compiled graph's own time).

    python3 tools/decode_step_profile.py --quantize int4 [--threads 2] [--prompt_len 128]
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
from llama import quantize  # noqa: E402
from llama.distributed import init_runtime  # noqa: E402
from llama.engine import Engine, EngineConfig, Request, SamplingParams, use_compiled_decode  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random_weights", default="llama3.2-1b", choices=sorted(bench.SHAPES))
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt_len", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runtime = init_runtime(use_gpus=False)
    model_args = bench.random_model_args(args.random_weights, 4096, 1, "bfloat16")
    if args.quantize != "none":
        model_args.quantize = args.quantize
        model_args.group_size = quantize.DEFAULT_GROUP_SIZE if args.quantize == "int4" else None
    model = bench.build_random_model(model_args, runtime, torch.bfloat16)
    use_compiled_decode(model)
    engine = Engine(model, EngineConfig())
    prompt = list(range(1, args.prompt_len + 1))
    engine.submit(Request(0, prompt, 1000, frozenset(), SamplingParams(temperature=0.0)))
    for _ in range(20):  # the prefill, compilation, warm-up
        engine.step()
    times = []
    for _ in range(30):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    print(f"{args.random_weights} {args.quantize}, {args.threads} threads: decode step median "
          f"{statistics.median(times) * 1e3:.2f} ms (fastest {min(times) * 1e3:.2f})")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
