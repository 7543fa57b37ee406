"""The engine's command-line flags, shared by generate.py, serve.py and benchmark.py, and the
pool's size they give."""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from llama.engine.engine import DEFAULT_BLOCK_SIZE, DEFAULT_PREFILL_CHUNK, EngineConfig
from llama.errors import UserError
from llama.model import Transformer

CPU_DEFAULT_GIB = 2.0
GPU_MEMORY_FRACTION = 0.85  # of the memory free once the weights are loaded


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("engine (paged KV cache)")
    group.add_argument("--kv_cache_tokens", type=int, help="size the KV cache pool in tokens (shared by all "
                       "sequences)")
    group.add_argument("--kv_cache_memory", type=float, metavar="GIB", help="size the pool in GiB per rank "
                       f"(default: {CPU_DEFAULT_GIB:g} GiB on CPU, {GPU_MEMORY_FRACTION * 100:.0f}%% of the GPU memory "
                       "left after the weights; never more than max_batch_size sequences of max_seq_len)")
    group.add_argument("--prefill_chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                       help="prompt tokens prefilled per step, between decode steps (default %(default)s)")
    group.add_argument("--no_prefix_caching", action="store_true", help="do not share the KV blocks of "
                       "prompts' common prefixes between requests")


def check_engine_arguments(args: argparse.Namespace) -> None:
    for flag in ("kv_cache_tokens", "kv_cache_memory", "prefill_chunk"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag} {value}: use a positive number")
    if args.kv_cache_tokens is not None and args.kv_cache_memory is not None:
        raise UserError("--kv_cache_tokens and --kv_cache_memory both size the pool; pass one of them")


def engine_config(args: argparse.Namespace, model: Transformer, max_num_seqs: int | None = None) -> EngineConfig:
    """The configuration the flags ask for; every rank gets the same pool size (on GPU, the
    smallest any rank has room for). Call on every rank."""
    max_num_seqs = max_num_seqs or model.args.max_batch_size
    block = DEFAULT_BLOCK_SIZE
    per_block = model.kv_cache_bytes_per_token() * block
    useful = max_num_seqs * -(-model.args.max_seq_len // block)
    if args.kv_cache_tokens:
        blocks = -(-args.kv_cache_tokens // block)
    else:
        device = model.output.weight.device
        if args.kv_cache_memory:
            budget = int(args.kv_cache_memory * 2**30)
        elif device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(device)[0] * GPU_MEMORY_FRACTION)
        else:
            budget = int(CPU_DEFAULT_GIB * 2**30)
        blocks = min(budget // per_block, useful)
        if dist.is_initialized() and dist.get_world_size() > 1:
            shared = torch.tensor([blocks], device=device)
            dist.all_reduce(shared, op=dist.ReduceOp.MIN)
            blocks = int(shared.item())
    if blocks < 1:
        raise UserError(f"the KV cache pool has room for no block of {block} tokens "
                        f"({per_block} bytes per rank); raise --kv_cache_memory or --kv_cache_tokens")
    return EngineConfig(num_blocks=blocks, block_size=block, max_num_seqs=max_num_seqs,
                        prefill_chunk=args.prefill_chunk, prefix_caching=not args.no_prefix_caching)


def describe_pool(config: EngineConfig, model: Transformer) -> str:
    tokens = config.num_blocks * config.block_size
    size = tokens * model.kv_cache_bytes_per_token()
    return (f"KV cache: {tokens} tokens ({config.num_blocks} blocks of {config.block_size}), "
            f"{size / 2**30:.2f} GiB per rank")
