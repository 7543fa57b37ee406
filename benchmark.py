"""Measure tensor-parallel inference: prefill, decode throughput and latency, memory, and how
close decode runs to the memory-bandwidth limit, optionally beside transformers' generate().

    torchrun --nproc_per_node K benchmark.py --converted_ckpt_dir OUT [--tokenizer_path T]
    torchrun --nproc_per_node 2 benchmark.py --random_weights llama3.2-1b --dtype bfloat16,float16 \\
        --batch_size 1,4 --prompt_len 128 --gen_len 128 --baseline hf --output_json bench.json

The TP degree is the world size. Sweeps take comma-separated values; every combination of
dtype, batch size, prompt length and generation length is one configuration.
"""

import argparse
import dataclasses
import importlib.util
import itertools
import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from llama import benchmarking as bench
from llama import quantize
from llama.args import ModelArgs
from llama.checkpoint import DEFAULT_DTYPE, DTYPES, load_converted
from llama.distributed import Runtime, add_timeout_argument, init_runtime, log, run_cli
from llama.errors import UserError
from llama.engine import use_compiled_decode
from llama.loadgen import run_load
from llama.model import Transformer
from llama.shm_collectives import for_mesh


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--converted_ckpt_dir", type=Path, help="output of convert_checkpoints.py")
    p.add_argument("--random_weights", metavar="SHAPE",
                   help=f"benchmark random weights of a release's exact shape, no checkpoint: {', '.join(bench.SHAPES)}")
    p.add_argument("--tokenizer_path", type=Path, help="default: the tokenizer.model stored with the checkpoint")
    p.add_argument("--model_args", type=Path, help="default: model_args.json in --converted_ckpt_dir")
    p.add_argument("--batch_size", default="1", help="comma-separated sweep, e.g. 1,4,8 (default 1)")
    p.add_argument("--prompt_len", default="128", help="comma-separated sweep of prompt tokens (default 128)")
    p.add_argument("--gen_len", default="128", help="comma-separated sweep of generated tokens (default 128)")
    p.add_argument("--dtype", default=DEFAULT_DTYPE, help=f"comma-separated sweep of {', '.join(DTYPES)} "
                   f"(default: {DEFAULT_DTYPE})")
    p.add_argument("--quantize", default="none", help="random weights: comma-separated sweep of none, int8, int4 "
                   "(weight-only; a converted checkpoint's model_args.json says its own)")
    p.add_argument("--group_size", type=int, default=quantize.DEFAULT_GROUP_SIZE,
                   help=f"random weights: int4's group size (default {quantize.DEFAULT_GROUP_SIZE})")
    p.add_argument("--trials", type=int, default=3, help="timed runs per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them (default 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--collectives", action="store_true",
                   help="instead: the latency of the TP all-reduce (4 and 64 KB) through the path the model uses "
                        "(shared memory or torch.distributed) beside torch.distributed's")
    p.add_argument("--baseline", choices=["hf"], help="also run transformers' LlamaForCausalLM.generate on the "
                                                      "same weights, device, dtype and threads")
    p.add_argument("--max_seq_len", type=int, help="cache length (default: the longest prompt_len + gen_len of the sweep)")
    p.add_argument("--max_batch_size", type=int, help="override model_args.json (random weights: the largest batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and weights")
    add_timeout_argument(p)
    p.add_argument("--output_json", type=Path, help="write every figure and the configuration here")
    p.add_argument("--csv", type=Path, nargs="?", const=Path("llama_benchmarks.csv"),
                   help="append one row per configuration (default file: llama_benchmarks.csv)")
    p.add_argument("--plot", type=Path, help="PNG of decode tokens/s and latency against batch size (matplotlib)")
    load = p.add_argument_group("load test of a running serve.py (plain python, no torchrun)")
    load.add_argument("--serve", metavar="URL", help="e.g. http://127.0.0.1:8000/v1: stream completions of "
                      "--prompt_len random tokens + --gen_len tokens from concurrent clients")
    load.add_argument("--concurrency", default="1,4,8", help="comma-separated sweep of clients (default 1,4,8)")
    load.add_argument("--requests", type=int, default=0, help="requests per concurrency (default 4 x clients)")
    load.add_argument("--request_rate", type=float, default=float("inf"),
                      help="mean arrivals per second, Poisson (default: all at once, --concurrency at a time)")
    load.add_argument("--shared_prefix", type=int, default=0, help="the prompts' first N tokens are the same "
                      "(the prefix cache: the first request's time to first token against the later ones')")
    load.add_argument("--long_prompt", type=int, default=0, help="once the streams decode, send one prompt of N "
                      "tokens (chunked prefill: the streams' largest gap while it is prefilled)")
    load.add_argument("--api_key", help="the server's --api_key")
    load.add_argument("--guided_json", type=Path, metavar="SCHEMA", help="also run the load with every request "
                      "constrained to this JSON schema file, alternating with unconstrained runs, --trials pairs "
                      "per concurrency; reports the median per-pair ratio of inter-token p50")
    return p.parse_args()


def int_list(flag: str, text: str, minimum: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--{flag} {text}: expected comma-separated integers, e.g. 1,4,8") from None
    if any(v < minimum for v in values):
        raise UserError(f"--{flag} {text}: every value must be at least {minimum}")
    return sorted(set(values))


def load_test(args: argparse.Namespace) -> None:
    """benchmark.py --serve: the load generator's figures at each concurrency, as JSON too."""
    prompt_len, gen_len = int_list("prompt_len", args.prompt_len, 1), int_list("gen_len", args.gen_len, 2)
    if len(prompt_len) > 1 or len(gen_len) > 1:
        raise UserError("--serve takes one --prompt_len and one --gen_len")
    if not 0 <= args.shared_prefix <= prompt_len[0]:
        raise UserError(f"--shared_prefix {args.shared_prefix}: use 0 to --prompt_len {prompt_len[0]}")
    if args.long_prompt < 0:
        raise UserError(f"--long_prompt {args.long_prompt}: use a positive number of tokens (or 0: none)")
    schema = read_json_schema(args.guided_json) if args.guided_json else None
    results = []
    for clients in int_list("concurrency", args.concurrency, 1):
        def run(guided_json: dict | None) -> dict:
            return run_load(args.serve, clients, args.requests or 4 * clients, prompt_len[0], gen_len[0],
                            args.api_key, args.seed, args.request_rate, args.shared_prefix, args.long_prompt,
                            guided_json)

        if schema is not None:
            results.append(compare_constrained(clients, [(run(None), run(schema)) for _ in range(args.trials)]))
            continue
        result = run(None)
        results.append(result)
        log(f"concurrency {clients}: {result['requests_per_s']:.2f} req/s, {result['output_tokens_per_s']:.1f} "
            f"output tok/s, TTFT p50/p99 {result['ttft_ms']['p50']:.0f}/{result['ttft_ms']['p99']:.0f} ms, "
            f"inter-token p50/p99 {result['inter_token_ms']['p50']:.0f}/{result['inter_token_ms']['p99']:.0f} ms")
        if "shared_prefix" in result:
            shared = result["shared_prefix"]
            log(f"  shared prefix of {shared['tokens']} tokens: TTFT first {shared['first_ttft_ms']:.0f} ms, "
                f"later p50 {shared['later_ttft_ms_p50'] or 0:.0f} ms")
        if "long_prompt" in result:
            long = result["long_prompt"]
            log(f"  a {long['tokens']}-token prompt: TTFT {long['ttft_ms']:.0f} ms; the streams' largest gap while "
                f"it was prefilled {long['streams_max_gap_ms']:.0f} ms, median gap {long['streams_median_gap_ms']:.0f} ms")
    report = {"config": {"serve": args.serve, "prompt_len": prompt_len[0], "gen_len": gen_len[0],
                         "shared_prefix": args.shared_prefix, "long_prompt": args.long_prompt,
                         "request_rate": None if args.request_rate == float("inf") else args.request_rate},
              "results": results}
    if args.output_json:
        args.output_json.write_text(json.dumps(report, indent=2) + "\n")


def read_json_schema(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--guided_json {path}: not a readable JSON schema ({e})") from None


def compare_constrained(clients: int, pairs: list[tuple[dict, dict]]) -> dict:
    """Unconstrained and constrained runs taken in turns: the median ratio of their inter-token
    p50 (each pair ran back to back, so slow spells of a shared host hit both)."""
    plain = [a["inter_token_ms"]["p50"] for a, _ in pairs]
    ratios = [b["inter_token_ms"]["p50"] / p50 for p50, (_, b) in zip(plain, pairs)]
    log(f"concurrency {clients}: inter-token p50 constrained / unconstrained, median of {len(pairs)} pairs: "
        f"{statistics.median(ratios):.3f} (pairs: {', '.join(f'{r:.3f}' for r in ratios)}; unconstrained p50 "
        f"{', '.join(f'{p50:.0f}' for p50 in plain)} ms)")
    return {"concurrency": clients, "inter_token_p50_ratio": statistics.median(ratios), "ratios": ratios,
            "unconstrained": [a for a, _ in pairs], "constrained": [b for _, b in pairs]}


def check_inputs(args: argparse.Namespace) -> None:
    """Everything that can be rejected before any model is built."""
    if bool(args.converted_ckpt_dir) == bool(args.random_weights) and not args.collectives:
        raise UserError("pass exactly one of --converted_ckpt_dir DIR or --random_weights SHAPE")
    if args.trials < 1 or args.warmup < 0:
        raise UserError("--trials must be at least 1 and --warmup at least 0")
    if args.baseline == "hf" and importlib.util.find_spec("transformers") is None:
        raise UserError("--baseline hf needs transformers: pip install transformers, or drop the flag")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install matplotlib, or drop the flag")
    if args.converted_ckpt_dir and args.quantize != "none":
        raise UserError("--quantize is for --random_weights; a converted checkpoint is benchmarked as "
                        "convert_checkpoints.py stored it (its model_args.json says how)")


def schemes(args: argparse.Namespace) -> list[quantize.Scheme | None]:
    """The --quantize sweep, smallest weights first (the unquantized model last)."""
    names = list(dict.fromkeys(args.quantize.split(",")))
    for name in names:
        if name != "none":
            quantize.check_scheme(name, args.group_size if name == "int4" else None)
    if args.baseline and names != ["none"]:
        raise UserError("--baseline hf runs unquantized weights only; drop --quantize or the baseline")
    order = {"int4": 0, "int8": 1, "none": 2}
    return [None if n == "none" else quantize.Scheme(n, args.group_size if n == "int4" else None)
            for n in sorted(names, key=order.__getitem__)]


def dtypes(args: argparse.Namespace) -> list[str]:
    names = args.dtype.split(",")
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise UserError(f"--dtype {args.dtype}: unknown {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    return list(dict.fromkeys(names))


def check_sweep(configs: list[bench.Config], model_args: ModelArgs) -> None:
    longest = max(c.prompt_len + c.gen_len for c in configs)
    if longest > model_args.max_seq_len:
        raise UserError(f"--prompt_len + --gen_len reaches {longest} tokens, above max_seq_len "
                        f"{model_args.max_seq_len}; shorten the sweep or raise --max_seq_len")
    largest = max(c.batch_size for c in configs)
    if largest > model_args.max_batch_size:
        raise UserError(f"--batch_size {largest} exceeds max_batch_size {model_args.max_batch_size}; "
                        "shrink the sweep or raise --max_batch_size")


def build_model(args: argparse.Namespace, runtime: Runtime, dtype_name: str, configs: list[bench.Config],
                scheme: quantize.Scheme | None = None) -> Transformer:
    dtype = DTYPES[dtype_name]
    # Each run's pool holds its sequences whole (llama.benchmarking.engine_for); max_seq_len
    # bounds them, by default the longest run of the sweep.
    max_seq_len = args.max_seq_len or max(c.prompt_len + c.gen_len for c in configs)
    if args.random_weights:
        largest_batch = max(c.batch_size for c in configs)
        model_args = bench.random_model_args(args.random_weights, max_seq_len,
                                             args.max_batch_size or largest_batch, dtype_name)
        if scheme:
            model_args.quantize, model_args.group_size = scheme.name, scheme.group_size
        check_sweep(configs, model_args)
        return bench.build_random_model(model_args, runtime, dtype, args.seed)
    model, _ = load_converted(args.converted_ckpt_dir, runtime, dtype, args.model_args, args.tokenizer_path,
                              max_seq_len, args.max_batch_size)
    check_sweep(configs, model.args)
    return model


def collectives(runtime: Runtime, output_json: Path | None) -> None:
    """benchmark.py --collectives."""
    if runtime.world_size == 1:
        raise UserError("--collectives measures the collectives between ranks: run it under torchrun with "
                        "--nproc_per_node 2 or more")
    log(f"TP={runtime.world_size} on {bench.device_name(runtime.device)}, {torch.get_num_threads()} thread(s) per "
        f"rank, torch {torch.__version__}, collectives: {for_mesh(runtime.mesh).path}")
    rows = bench.measure_collectives(runtime)
    log(bench.format_collectives(rows))
    if output_json and runtime.is_main:
        output_json.write_text(json.dumps({"collectives": for_mesh(runtime.mesh).path, "all_reduce": rows},
                                          indent=2) + "\n")


def main() -> None:
    args = parse_args()
    if args.serve:
        load_test(args)
        return
    check_inputs(args)
    runtime = init_runtime(timeout_s=args.timeout)
    if args.collectives:
        collectives(runtime, args.output_json)
        return
    configs = [bench.Config(b, p, g) for b, p, g in itertools.product(
        int_list("batch_size", args.batch_size, 1), int_list("prompt_len", args.prompt_len, 1),
        int_list("gen_len", args.gen_len, 2))]
    dtype_names, quantized = dtypes(args), schemes(args)
    threads = torch.get_num_threads()
    log(f"{args.random_weights or args.converted_ckpt_dir}: TP={runtime.world_size} on "
        f"{bench.device_name(runtime.device)}, {threads} thread(s) per rank, torch {torch.__version__}, "
        f"compile {'on' if args.compile else 'off'}, collectives: {for_mesh(runtime.mesh).path}")

    results, ceilings, memory = [], {}, bench.PeakMemory(runtime.device)
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        # A --quantize sweep's models are built together and their trials alternate, so a change
        # in the machine's load touches all of them alike (their memory is then counted together).
        models = {scheme: build_model(args, runtime, dtype_name, configs, scheme) for scheme in quantized}
        largest = models[quantized[-1]]
        model_args = dataclasses.asdict(largest.args)
        if args.compile:
            for model in models.values():
                use_compiled_decode(model)
        hf_model = bench.build_hf_model(largest, runtime) if args.baseline else None
        memory.exclude(hf_model)
        rounds, runs = [], []  # runs: (config, its measurements by scheme, this rank's peak memory)
        for config in configs:
            memory.reset()
            measured = {scheme: bench.Measurement(config) for scheme in models}
            for trial in range(args.trials):
                # The ceiling is measured again before every round of trials (see median_ceiling).
                rounds.append(bench.measure_bandwidth_ceiling(largest.args, runtime.world_size, dtype,
                                                              runtime.device))
                for scheme, model in models.items():
                    one = bench.run_config(model, config, args.warmup if trial == 0 else 0, 1, bool(args.baseline),
                                           hf_model, threads * runtime.world_size, args.seed, memory)
                    measured[scheme].trials += one.trials
                    measured[scheme].baseline_trials += one.baseline_trials
            runs.append((config, measured, memory.read()))
        ceilings[dtype_name] = ceiling = bench.median_ceiling(rounds)
        log(f"{dtype_name}: bandwidth ceiling {ceiling['ceiling_gb_per_s']:.1f} GB/s, the median of {len(rounds)} "
            f"measured between the rounds of trials ({min(ceiling['rounds_gb_per_s']):.1f}-"
            f"{max(ceiling['rounds_gb_per_s']):.1f}; that one: read {ceiling['read_gb_per_s']:.1f} (its reads "
            f"{ceiling['read_spread_gb_per_s'][0]:.1f}-{ceiling['read_spread_gb_per_s'][-1]:.1f}), "
            f"matvec {ceiling['matvec_gb_per_s']:.1f})")
        for config, measured, peak in runs:
            for scheme, model in models.items():
                result = bench.summarize(measured[scheme], model, dtype_name, ceiling, peak)
                result["quantize"] = scheme.describe() if scheme else None
                results.append(result)
                log(f"  {result['quantize'] or dtype_name}: batch {config.batch_size} prompt {config.prompt_len} "
                    f"gen {config.gen_len}: decode {result['decode_tokens_per_s_batch']['median']:.2f} tok/s, "
                    f"prefill {result['prefill_tokens_per_s']['median']:.1f} tok/s")
        del models, largest, hf_model

    log(bench.format_table(results))
    report = {"config": {
        "model": args.random_weights or str(args.converted_ckpt_dir), "random_weights": bool(args.random_weights),
        "model_args": model_args, "device": runtime.device.type,
        "device_name": bench.device_name(runtime.device), "world_size": runtime.world_size,
        "threads_per_rank": threads, "torch_version": torch.__version__, "compile": args.compile,
        "baseline": args.baseline, "trials": args.trials, "warmup": args.warmup,
        "collectives": for_mesh(runtime.mesh).path,
    }, "bandwidth_ceiling": ceilings, "results": results}
    if runtime.is_main:
        bench.write_outputs(report, args.output_json, args.csv, args.plot)
    dist.barrier()


if __name__ == "__main__":
    run_cli(main)
