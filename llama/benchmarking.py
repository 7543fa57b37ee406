"""What benchmark.py measures, and how: timings of generate(), their statistics, the decode
roofline and the bandwidth ceiling it is compared with, random-weight models of Meta's
shapes, the transformers baseline, and the table/JSON/CSV/plot outputs.

Every figure is measured on every rank at once; a time is the slowest rank's, a byte
count the sum over ranks, so a TP=k run is reported as one machine.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llama import cpu_linear, quantize, shm_collectives
from llama.args import ModelArgs
from llama.distributed import Runtime, log, max_over_ranks, peak_rss_bytes
from llama.errors import UserError
from llama.engine import Engine, EngineConfig, generate, single_row_kernels
from llama.engine.engine import DEFAULT_BLOCK_SIZE
from llama.model import Transformer
from llama.parallel import build_sharded, local_kv_heads

# Exact hyper-parameters of Meta's params.json for each release (Llama 2 leaves vocab_size
# to its 32000-token tokenizer). max_seq_len is the release's context length.
SHAPES: dict[str, dict[str, object]] = {
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-5,
                      max_seq_len=4096),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, norm_eps=1e-5,
                       max_seq_len=4096),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
                       ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=4096),
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                      ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
    "llama3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                       ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                        ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
                        max_seq_len=131072),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                        ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
                        max_seq_len=131072),
}

# The bandwidth ceiling streams a model-sized set of weights, capped to bound the extra
# memory, and never smaller than this (far beyond any last-level cache).
CEILING_MIN_BYTES = 256 * 2**20
CEILING_MAX_BYTES = 1 * 2**30


# ---------------------------------------------------------------------------------------
# Statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default), so p50 of an even-sized sample is the mean of the middle two."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of one figure over the trials."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


@dataclass
class Trial:
    """One timed generate(): seconds to the first token, then the seconds of each further step."""

    ttft_s: float
    step_s: list[float]


def trial_metrics(trials: Sequence[Trial], batch_size: int, prompt_len: int) -> dict[str, object]:
    """Throughput and latency figures of one configuration from its timed trials.

    Prefill covers the prompt and the first token (what a user waits for); decode covers the
    remaining steps, one token per sequence each. Latency percentiles pool every decode step
    of every trial."""
    prefill = [batch_size * prompt_len / t.ttft_s for t in trials]
    per_seq = [len(t.step_s) / sum(t.step_s) for t in trials]
    steps = [s for t in trials for s in t.step_s]
    return {
        "ttft_ms": spread([1e3 * t.ttft_s for t in trials]),
        "prefill_tokens_per_s": spread(prefill),
        "decode_tokens_per_s_per_seq": spread(per_seq),
        "decode_tokens_per_s_batch": spread([batch_size * r for r in per_seq]),
        "decode_latency_ms": {f"p{q}": 1e3 * percentile(steps, q) for q in (50, 90, 99)},
    }


# ---------------------------------------------------------------------------------------
# Roofline


KV_WEIGHTS = ("attention.wk.weight", "attention.wv.weight")
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def decode_bytes_per_step(args: ModelArgs, tp: int, batch_size: int, cache_len: int, element_size: int) -> int:
    """Bytes one decode step must read on one rank: every local weight except the embedding
    table (of which it reads one row per sequence) plus cache_len positions of the KV cache.
    Quantized linear weights count what their kernels read: the values, scales and zeros
    (element_size is the activations' dtype's)."""
    scheme = quantize.scheme_of(args)
    linears = 0
    for name, shape in args.weight_shapes().items():
        if len(shape) == 1 or name == quantize.EMBEDDING:
            continue
        rows, cols = shape
        if name.endswith(KV_WEIGHTS):
            rows = local_kv_heads(args.n_kv_heads, tp) * args.head_dim
        elif name.endswith(ROW_PARALLEL):
            cols //= tp
        else:
            rows //= tp
        linears += (quantize.stored_bytes(scheme, rows, cols, element_size) if quantize.quantizes(scheme, name, args.n_layers)
                    else rows * cols * element_size)
    norms = sum(shape[0] for shape in args.weight_shapes().values() if len(shape) == 1)
    embedding_rows = batch_size * args.dim // tp
    return linears + element_size * (norms + embedding_rows) + kv_cache_bytes(args, tp, batch_size, cache_len,
                                                                             element_size)


def prefill_flops(args: ModelArgs, prompt_len: int) -> int:
    """Floating-point operations of one prompt's prefill over all ranks: a multiply and an add per
    weight of every linear layer (the output projection too) per token, and in each layer the two
    products of causal attention, scores and values, over half the square of the prompt."""
    linear_weights = sum(math.prod(shape) for name, shape in args.weight_shapes().items()
                         if len(shape) == 2 and name != quantize.EMBEDDING)
    return 2 * linear_weights * prompt_len + 2 * args.n_layers * prompt_len**2 * args.n_heads * args.head_dim


def kv_cache_bytes(args: ModelArgs, tp: int, batch_size: int, cache_len: int, element_size: int) -> int:
    """Keys and values of every layer on one rank."""
    return 2 * args.n_layers * batch_size * local_kv_heads(args.n_kv_heads, tp) * cache_len * args.head_dim * element_size


def roofline(bytes_per_step: int, step_s: float, ceiling_bytes_per_s: float) -> dict[str, float]:
    """Achieved bandwidth of a decode step and its fraction of the measured ceiling."""
    achieved = bytes_per_step / step_s
    return {"achieved_gb_per_s": achieved / 1e9, "ceiling_gb_per_s": ceiling_bytes_per_s / 1e9,
            "fraction_of_ceiling": achieved / ceiling_bytes_per_s}


def _time_on_all_ranks(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds per call of `fn` run simultaneously on every rank (the slowest rank counts)."""
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        dist.barrier()
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return max_over_ranks(times, device)[1:]  # the slowest rank's time is the group's


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth_ceiling(args: ModelArgs, tp: int, dtype: torch.dtype, device: torch.device,
                              repeats: int = 5) -> dict[str, float]:
    """The fastest rate, in bytes/s summed over ranks, at which this device reads memory in
    `dtype`: the better of a read of a model-sized set of weights per rank and a stream of
    matrix-vector products over them shaped like the model's (batch 1, as in decode). On CPU the
    read is the kernels' (every thread its own contiguous part, prefetched: llama.cpu_linear's
    read_memory), where a reduction (tensor.sum()) was bound by its arithmetic on some CPUs;
    elsewhere a reduction. read_spread_gb_per_s: the reads' slowest, median and fastest rates."""
    element_size = torch.empty((), dtype=dtype).element_size()
    rows, cols = args.ffn_hidden_dim // tp, args.dim
    budget = decode_bytes_per_step(args, tp, 1, 0, element_size)
    budget = min(max(budget, CEILING_MIN_BYTES), CEILING_MAX_BYTES)
    n_matrices = max(1, budget // (rows * cols * element_size))
    # Filled with normal numbers: uninitialized memory may hold denormals, slow on some CPUs.
    flat = torch.empty(n_matrices * rows * cols, dtype=dtype, device=device).uniform_(-1, 1)
    weights = flat.view(n_matrices, rows, cols).unbind(0)
    x = torch.empty(1, 1, cols, dtype=dtype, device=device).uniform_(-1, 1)
    nbytes = flat.numel() * element_size * dist.get_world_size()

    kernels_read = device.type == "cpu" and cpu_linear.read_memory(flat[:0]) is not None
    reads = _time_on_all_ranks((lambda: cpu_linear.read_memory(flat)) if kernels_read else flat.sum, device, repeats)
    read = min(reads)
    with single_row_kernels(device):  # the fastest matrix-vector kernel generate() knows
        matvec = min(_time_on_all_ranks(lambda: [cpu_linear.linear(x, w) for w in weights], device,
                                        repeats))
    rates = sorted(nbytes / t / 1e9 for t in reads)
    return {"read_gb_per_s": nbytes / read / 1e9, "matvec_gb_per_s": nbytes / matvec / 1e9,
            "ceiling_gb_per_s": nbytes / min(read, matvec) / 1e9, "bytes_streamed": nbytes,
            "read_spread_gb_per_s": [rates[0], rates[len(rates) // 2], rates[-1]]}


def median_ceiling(rounds: list[dict[str, float]]) -> dict[str, object]:
    """Of ceilings measured through a run (one before each round of trials), the measurement of
    median rate, with every round's rate (rounds_gb_per_s). On a shared machine the rate moves
    by ±20% from minute to minute; one measurement at the start put some runs' decode at 115-147%
    of it, while decode figures are medians over the run."""
    ordered = sorted(rounds, key=lambda r: r["ceiling_gb_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds_gb_per_s": [r["ceiling_gb_per_s"] for r in rounds]}


# ---------------------------------------------------------------------------------------
# Models


def random_model_args(shape: str, max_seq_len: int | None, max_batch_size: int, dtype: str) -> ModelArgs:
    if shape not in SHAPES:
        raise UserError(f"--random_weights {shape}: unknown shape; choose one of {', '.join(SHAPES)}")
    params = dict(SHAPES[shape], max_batch_size=max_batch_size, dtype=dtype)
    if max_seq_len:
        params["max_seq_len"] = max_seq_len
    return ModelArgs(**params)


@torch.no_grad()
def build_random_model(args: ModelArgs, runtime: Runtime, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """A model of `args`' shape with random weights, built directly sharded: on the meta
    device, parallelized, then only each rank's local shard is allocated and filled."""
    model = build_sharded(args, runtime.mesh, runtime.device, dtype)
    generator = torch.Generator(device=runtime.device).manual_seed(seed + runtime.rank)
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if name.endswith("norm.weight"):
            local.fill_(1.0)
        elif name.endswith(".zeros"):
            local.zero_()
        elif name.endswith(".scales"):  # quantized values times these span about +-0.02 too
            local.fill_(0.02 / (127 if local.dim() == 1 else 8))
        elif not local.is_floating_point():  # quantized values: every code equally likely
            info = torch.iinfo(local.dtype)
            local.random_(-127 if info.min < 0 else 0, info.max + 1, generator=generator)
        else:  # the scale of a trained model's weights keeps fp16 activations in range
            local.uniform_(-0.02, 0.02, generator=generator)
    quantize.pack_for_device(model)
    return model.eval().requires_grad_(False)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights this rank holds."""
    return sum(_local(p).numel() * p.element_size() for p in model.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class PeakMemory:
    """Peak memory of this process during the project's own trials since the last reset: CUDA's
    max allocated/reserved, or on CPU the peak resident set size (Linux lets a process reset
    its high-water mark; elsewhere it covers the whole process lifetime). The weights of a
    baseline model that stays on this rank meanwhile are left out (see exclude)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.excluded_bytes = 0
        self.peak: dict[str, int] = {}

    def exclude(self, module: torch.nn.Module | None) -> None:
        """Leave out the parameters and buffers of `module` (None: nothing)."""
        tensors = [] if module is None else [*module.parameters(), *module.buffers()]
        self.excluded_bytes = sum(t.numel() * t.element_size() for t in tensors)

    def reset(self) -> None:
        self.peak = {}

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Count the peak of what runs inside (max over every use since reset())."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()
        yield
        if self.device.type == "cuda":
            now = {"max_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
                   "max_reserved_bytes": torch.cuda.max_memory_reserved(self.device)}
        else:
            now = {"peak_rss_bytes": _peak_rss()}
        self.peak = {k: max(self.peak.get(k, 0), v - self.excluded_bytes) for k, v in now.items()}

    def read(self) -> dict[str, int]:
        return self.peak


_PROC_STATUS = Path("/proc/self/status")


def _reset_peak_rss() -> None:
    """Make the peak resident set size start again from the current one (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the peak stays the process lifetime's
        pass


def _peak_rss() -> int:
    try:
        return 1024 * int(re.search(r"VmHWM:\s+(\d+) kB", _PROC_STATUS.read_text())[1])
    except (OSError, TypeError):
        return peak_rss_bytes()


def gather_per_rank(value: dict[str, int]) -> list[dict[str, int]]:
    gathered: list[dict[str, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


# ---------------------------------------------------------------------------------------
# Running one configuration


@dataclass
class Config:
    batch_size: int
    prompt_len: int
    gen_len: int


def random_prompts(config: Config, vocab_size: int, seed: int) -> list[list[int]]:
    """Token ids drawn uniformly (identically on every rank): speed does not depend on them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (config.batch_size, config.prompt_len), generator=g).tolist()


def engine_for(model: Transformer, config: Config) -> Engine:
    """A fresh engine (an empty prefix cache: every trial computes its prompts) whose pool holds
    the configuration's sequences whole and whose first step prefills every prompt, so that the
    time to the first token is one step."""
    return Engine(model, EngineConfig(max_num_seqs=config.batch_size, prefix_caching=False,
                                      prefill_chunk=config.batch_size * config.prompt_len))


def pool_tokens(model: Transformer, config: Config) -> int:
    """The tokens engine_for's pool holds, with the runner's scratch block."""
    block = DEFAULT_BLOCK_SIZE
    return (config.batch_size * -(-model.args.max_seq_len // block) + 1) * block


def time_generate(engine: Engine, prompts: list[list[int]], gen_len: int) -> Trial:
    """One greedy generate() of exactly gen_len tokens, timed through its streaming hook
    (called right after each step's single host sync)."""
    stamps: list[float] = []
    dist.barrier()
    start = time.perf_counter()
    generate(engine, prompts, gen_len, stop_ids=frozenset(), temperature=0.0,
             on_tokens=lambda _: stamps.append(time.perf_counter()))
    ttft, *steps = max_over_ranks([stamps[0] - start] + [b - a for a, b in zip(stamps, stamps[1:])],
                                   engine.runner.device)  # the slowest rank's times are the group's
    return Trial(ttft, steps)


def time_hf_generate(hf_model: torch.nn.Module, prompts: list[list[int]], gen_len: int) -> Trial:
    """The same greedy generation through transformers' generate(), timed per token by a streamer."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    device = hf_model.device
    input_ids = torch.tensor(prompts, device=device)
    stamps = Stamps()
    start = time.perf_counter()
    hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=gen_len,
                      min_new_tokens=gen_len, do_sample=False, streamer=stamps, pad_token_id=0,
                      eos_token_id=None)
    times = stamps.times[1:]  # the first put() is the prompt itself
    return Trial(times[0] - start, [b - a for a, b in zip(times, times[1:])])


@dataclass
class Measurement:
    config: Config
    trials: list[Trial] = field(default_factory=list)
    baseline_trials: list[Trial] = field(default_factory=list)


def run_config(model: Transformer, config: Config, warmup: int, trials: int, baseline: bool,
               hf_model: torch.nn.Module | None, hf_threads: int, seed: int, memory: PeakMemory) -> Measurement:
    """Warm-up runs (not counted), then timed trials of ours and, with `baseline`, of
    transformers' (on rank 0, which holds `hf_model`). The two alternate run by run, so a
    change in the machine's load during the run touches both sides of the ratio alike.
    `memory` measures our runs only."""
    prompts = random_prompts(config, model.args.vocab_size, seed)
    result = Measurement(config)
    for i in range(warmup + trials):
        with memory.measuring():
            ours = time_generate(engine_for(model, config), prompts, config.gen_len)
        theirs = _time_baseline(hf_model, prompts, config.gen_len, hf_threads) if baseline else None
        if i >= warmup:
            result.trials.append(ours)
            if theirs:
                result.baseline_trials.append(theirs)
    return result


def _time_baseline(hf_model: torch.nn.Module | None, prompts: list[list[int]], gen_len: int,
                   threads: int) -> Trial | None:
    """One baseline run on rank 0 alone, with the threads of the whole TP group; the other
    ranks wait at a barrier."""
    trial = None
    if hf_model is not None:
        own_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            trial = time_hf_generate(hf_model, prompts, gen_len)
        finally:
            torch.set_num_threads(own_threads)
    dist.barrier()
    return trial


def summarize(measured: Measurement, model: Transformer, dtype: str, ceiling: dict[str, float],
              peak: dict[str, int]) -> dict[str, object]:
    """Every figure of one configuration, `peak` this rank's PeakMemory reading for its trials
    (collective: all ranks call it)."""
    config, tp = measured.config, dist.get_world_size()
    element_size = model.tok_embeddings.weight.element_size()  # the activations' (output may be quantized)
    # Decode attention reads each sequence's blocks: llama.cpu_linear's on CPU up to its position,
    # on average the prompt and half the output; elsewhere (torch's) its whole block table, a
    # power of two of blocks that covers the longest sequence.
    block = DEFAULT_BLOCK_SIZE
    blocks = -(-(config.prompt_len + config.gen_len) // block)
    attended = min(1 << (blocks - 1).bit_length(), -(-model.args.max_seq_len // block)) * block
    if model.tok_embeddings.weight.device.type == "cpu" and cpu_linear.has_decode_attention():
        attended = config.prompt_len + config.gen_len // 2
    bytes_per_step = tp * decode_bytes_per_step(model.args, tp, config.batch_size, attended, element_size)
    ours = trial_metrics(measured.trials, config.batch_size, config.prompt_len)
    step_s = 1 / ours["decode_tokens_per_s_per_seq"]["median"]
    peaks = gather_per_rank(peak)
    result = {
        "dtype": dtype, "batch_size": config.batch_size, "prompt_len": config.prompt_len, "gen_len": config.gen_len,
        **ours,
        "prefill_tflop_per_s": ours["prefill_tokens_per_s"]["median"] / config.prompt_len
        * prefill_flops(model.args, config.prompt_len) / 1e12,
        "bytes_per_decode_step": bytes_per_step,
        "roofline": roofline(bytes_per_step, step_s, ceiling["ceiling_gb_per_s"] * 1e9),
        "weight_bytes_per_rank": weight_bytes(model),
        "kv_cache_bytes_per_rank": model.kv_cache_bytes_per_token() * pool_tokens(model, config),
        "peak_memory_per_rank": peaks,
        # The largest rank's peak: CUDA max allocated, or peak RSS on CPU.
        "peak_memory_bytes": max(next(iter(p.values())) for p in peaks),
    }
    baseline = _broadcast(measured.baseline_trials)
    if baseline:
        theirs = trial_metrics(baseline, config.batch_size, config.prompt_len)
        result["baseline"] = {"impl": "transformers LlamaForCausalLM.generate", **theirs}
        result["baseline_ratio"] = {  # ours / transformers', medians of the same run
            "decode_tokens_per_s": ours["decode_tokens_per_s_per_seq"]["median"]
            / theirs["decode_tokens_per_s_per_seq"]["median"],
            "prefill_tokens_per_s": ours["prefill_tokens_per_s"]["median"] / theirs["prefill_tokens_per_s"]["median"],
        }
    return result


def _broadcast(trials: list[Trial]) -> list[Trial]:
    """Rank 0's trials on every rank (the baseline runs on rank 0 only)."""
    box = [trials]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------
# The transformers baseline


def _permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates adjacent pairs, transformers rotates the two halves of each head: reorder
    the rows of wq/wk so both compute the same attention."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


HF_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_state_dict(meta_state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Meta-named full weights -> transformers' LlamaForCausalLM names and layout."""
    out = {"model.embed_tokens.weight": meta_state["tok_embeddings.weight"],
           "model.norm.weight": meta_state["norm.weight"], "lm_head.weight": meta_state["output.weight"]}
    for i in range(args.n_layers):
        for ours, theirs in HF_NAMES.items():
            w = meta_state[f"layers.{i}.{ours}.weight"]
            if ours == "attention.wq":
                w = _permute_for_hf(w, args.n_heads)
            elif ours == "attention.wk":
                w = _permute_for_hf(w, args.n_kv_heads)
            out[f"model.layers.{i}.{theirs}.weight"] = w
    return out


def hf_config(args: ModelArgs, dtype: torch.dtype) -> object:
    from transformers import LlamaConfig

    rope: dict[str, object] = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope |= {"rope_type": "llama3", "factor": args.rope_scaling_factor, "low_freq_factor": 1.0,
                 "high_freq_factor": args.rope_high_freq_factor, "original_max_position_embeddings": 8192}
    return LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
                       num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                       num_key_value_heads=args.n_kv_heads, max_position_embeddings=args.max_seq_len,
                       rms_norm_eps=args.norm_eps, rope_parameters=rope, tie_word_embeddings=False,
                       head_dim=args.head_dim, dtype=dtype)


def build_hf_model(model: Transformer, runtime: Runtime) -> torch.nn.Module | None:
    """transformers' LlamaForCausalLM holding our model's weights, on rank 0 (None elsewhere).
    Every rank takes part in gathering the full weights, one tensor at a time, and rank 0
    keeps each on the CPU: no device ever holds more than one unsharded weight beside its
    shards. Rank 0 then moves the model to its device, if it fits there."""
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights

    full = {}
    state = model.state_dict()
    for name in model.args.weight_shapes():
        gathered = _full(state[name])
        if runtime.is_main:
            full[name] = gathered.cpu()
        del gathered
    if not runtime.is_main:
        return None
    if runtime.device.type == "cuda":
        needed, (free, _) = sum(t.nbytes for t in full.values()), torch.cuda.mem_get_info(runtime.device)
        if needed > free:
            raise UserError(f"--baseline hf needs the whole model on rank 0's GPU ({needed / 1e9:.1f} GB) but only "
                            f"{free / 1e9:.1f} GB is free there; drop --baseline, or benchmark a smaller shape")
    dtype = model.output.weight.dtype
    with no_init_weights(), torch.device("meta"):
        hf = LlamaForCausalLM(hf_config(model.args, dtype))
    hf.load_state_dict(hf_state_dict(full, model.args), strict=True, assign=True)
    # The rotary table is a non-persistent buffer, left on meta: rebuild it.
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
    return hf.to(runtime.device).eval()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------------------
# The TP group's collectives (benchmark.py --collectives)

# The all-reduce of one decode step at batch 1 of a 2048-wide model (4 KB of bf16), and a
# prefill's of 16 tokens or a batch of 16 (64 KB).
COLLECTIVE_BYTES = (4 * 1024, 64 * 1024)


def measure_collectives(runtime: Runtime, dtype: torch.dtype = torch.bfloat16, calls: int = 2000,
                        rounds: int = 4, chain: int = 16) -> list[dict[str, object]]:
    """Median latency of one all-reduce of each size in COLLECTIVE_BYTES through the path the
    model uses, eager and inside a compiled function (`chain` all-reduces in a row, as in a
    compiled decode step, timed together), and through torch.distributed directly. The three
    alternate in `rounds` rounds, so a change of load touches them alike. Each figure is the
    slowest rank's median, in microseconds."""
    collectives = shm_collectives.for_mesh(runtime.mesh)
    group = runtime.mesh.get_group()

    def chained(x: torch.Tensor) -> torch.Tensor:
        for _ in range(chain):
            x = collectives.all_reduce(x)
        return x

    path = collectives.path.split(":")[0]
    impls: dict[str, tuple[Callable[[torch.Tensor], object], int]] = {
        f"TP plan ({path})": (collectives.all_reduce, 1),
        f"TP plan ({path}), compiled": (torch.compile(chained, fullgraph=True), chain),
        f"dist.all_reduce ({dist.get_backend(group)})": (lambda x: dist.all_reduce(x, group=group), 1),
    }
    rows = []
    for nbytes in COLLECTIVE_BYTES:
        x = torch.zeros(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=runtime.device)
        times: dict[str, list[float]] = {name: [] for name in impls}
        for impl, _ in impls.values():  # warm-up (and compilation)
            for _ in range(3):
                impl(x)
        for _ in range(rounds):
            for name, (impl, ops) in impls.items():
                dist.barrier(group)
                for _ in range(calls // rounds // ops):
                    start = time.perf_counter()
                    impl(x)
                    _synchronize(runtime.device)
                    times[name].append((time.perf_counter() - start) / ops)
        medians = max_over_ranks([1e6 * statistics.median(t) for t in times.values()], runtime.device)
        rows.append({"bytes": nbytes, "dtype": str(dtype).removeprefix("torch."), "ranks": runtime.world_size,
                     "median_us": dict(zip(impls, medians))})
    return rows


def format_collectives(rows: list[dict[str, object]]) -> str:
    names = list(rows[0]["median_us"])
    lines = [("all-reduce", *names)] + [(f"{r['bytes'] // 1024} KB {r['dtype']}", *(
        f"{r['median_us'][n]:.1f} us" for n in names)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


# ---------------------------------------------------------------------------------------
# Output


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def result_row(result: dict[str, object]) -> dict[str, object]:
    """The flat CSV row of one configuration's result (medians for spreads)."""
    row: dict[str, object] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                if not isinstance(v, (dict, list)):
                    row[f"{key}.{sub}"] = v
        elif not isinstance(value, list):
            row[key] = value
    return row


def append_csv(path: Path, rows: list[dict[str, object]]) -> None:
    """Append rows, writing the header when the file is new; the columns of an existing file win."""
    new = not path.exists() or path.stat().st_size == 0
    if new:
        columns = list(rows[0])
    else:
        with path.open(newline="") as f:
            columns = next(csv.reader(f))
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def format_table(results: list[dict[str, object]]) -> str:
    """The human-readable summary: medians, and the baseline beside ours with the ratio of
    decode tokens/s. Peak GB is the largest rank's (peak RSS on CPU: since the process began)."""
    header = ("dtype", "impl", "batch", "prompt", "gen", "prefill tok/s", "TTFT ms", "decode tok/s/seq",
              "decode tok/s", "p50 ms", "p90 ms", "p99 ms", "GB/s", "% ceiling", "weights GB", "peak GB", "vs hf")
    lines = [header]
    for r in results:
        for impl, figures in (("ours", r), ("hf", r.get("baseline"))):
            if not figures:
                continue
            lat = figures["decode_latency_ms"]
            ratio = r["baseline_ratio"]["decode_tokens_per_s"] if impl == "ours" and r.get("baseline") else None
            lines.append((
                r["dtype"] + (f" {r['quantize']}" if r.get("quantize") else ""), impl, str(r["batch_size"]),
                str(r["prompt_len"]), str(r["gen_len"]),
                f"{figures['prefill_tokens_per_s']['median']:.1f}", f"{figures['ttft_ms']['median']:.1f}",
                f"{figures['decode_tokens_per_s_per_seq']['median']:.2f}",
                f"{figures['decode_tokens_per_s_batch']['median']:.2f}",
                f"{lat['p50']:.1f}", f"{lat['p90']:.1f}", f"{lat['p99']:.1f}",
                f"{figures['roofline']['achieved_gb_per_s']:.1f}" if impl == "ours" else "",
                f"{100 * figures['roofline']['fraction_of_ceiling']:.0f}%" if impl == "ours" else "",
                f"{figures['weight_bytes_per_rank'] / 1e9:.2f}" if impl == "ours" else "",
                f"{figures['peak_memory_bytes'] / 1e9:.2f}" if impl == "ours" else "",
                f"{ratio:.2f}x" if ratio else "",
            ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def write_plot(path: Path, results: list[dict[str, object]]) -> None:
    """Decode tokens/s and p50 step latency against batch size, one line per dtype and lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, lat) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple[str, str, int, int], list[dict[str, object]]] = {}
    for r in results:
        series.setdefault((r["dtype"], "ours", r["prompt_len"], r["gen_len"]), []).append(r)
        if r.get("baseline"):
            series.setdefault((r["dtype"], "hf", r["prompt_len"], r["gen_len"]), []).append(
                r["baseline"] | {"batch_size": r["batch_size"]})
    for (dtype, impl, prompt_len, gen_len), points in series.items():
        points = sorted(points, key=lambda p: p["batch_size"])
        label = f"{impl} {dtype} prompt {prompt_len} gen {gen_len}"
        batches = [p["batch_size"] for p in points]
        tput.plot(batches, [p["decode_tokens_per_s_batch"]["median"] for p in points], marker="o", label=label)
        lat.plot(batches, [p["decode_latency_ms"]["p50"] for p in points], marker="o", label=label)
    tput.set(xlabel="batch size", ylabel="decode tokens/s (batch)", title="Decode throughput")
    lat.set(xlabel="batch size", ylabel="decode step p50 (ms)", title="Decode latency")
    tput.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_outputs(report: dict[str, object], json_path: Path | None, csv_path: Path | None,
                  plot_path: Path | None) -> None:
    """The files asked for; the CSV rows repeat the run's configuration beside each result."""
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {json_path}")
    if csv_path:
        run = {k: v for k, v in report["config"].items() if not isinstance(v, dict)}
        append_csv(csv_path, [run | result_row(r) for r in report["results"]])
        log(f"appended {len(report['results'])} row(s) to {csv_path}")
    if plot_path:
        write_plot(plot_path, report["results"])
        log(f"wrote {plot_path}")
