"""Convert Meta's fairscale shards (consolidated.XX.pth + params.json) into a DCP checkpoint.

    torchrun --nproc_per_node N convert_checkpoints.py --original_ckpt_dir DIR \
        --tokenizer_path DIR/tokenizer.model --save_checkpoint_dir OUT
"""

import argparse
from pathlib import Path

from llama import quantize
from llama.checkpoint import DTYPES, MetaCheckpoint, convert
from llama.distributed import init_runtime, run_cli
from llama.errors import UserError


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original_ckpt_dir", type=Path, required=True, help="folder with params.json and consolidated.*.pth")
    p.add_argument("--tokenizer_path", type=Path, help="tokenizer.model (default: the one in --original_ckpt_dir)")
    p.add_argument("--save_checkpoint_dir", type=Path, required=True, help="output folder for the DCP checkpoint")
    p.add_argument("--model_parallel_size", type=int, help="number of shards; detected from the files if omitted")
    p.add_argument("--max_seq_len", type=int, default=2048, help="longest prompt + generation to allow")
    p.add_argument("--max_batch_size", type=int, default=4, help="most prompts generated together")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the stored weights")
    p.add_argument("--quantize", metavar="SCHEME", help="store the linear weights quantized: int8 (one scale per "
                   "output row) or int4 (one scale and zero per group of inputs); the embedding stays in --dtype")
    p.add_argument("--group_size", type=int, help=f"int4's group size: {', '.join(map(str, quantize.GROUP_SIZES))} "
                   f"(default {quantize.DEFAULT_GROUP_SIZE})")
    p.add_argument("--keep_fp8", action="store_true", help="Llama 3.1 405B FP8: store its FP8 weights as they are, "
                   "with row-wise scales (run as FP8 products on GPUs that have them); default: dequantized to --dtype")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save_checkpoint_dir")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    for flag in ("max_seq_len", "max_batch_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: use a positive number")
    group_size = args.group_size or (quantize.DEFAULT_GROUP_SIZE if args.quantize == "int4" else None)
    quantize.check_scheme(args.quantize, group_size)
    if args.keep_fp8 and args.quantize:
        raise UserError(f"--keep_fp8 and --quantize {args.quantize}: choose one")
    runtime = init_runtime(use_gpus=False)
    ckpt = MetaCheckpoint(args.original_ckpt_dir, args.tokenizer_path, args.model_parallel_size,
                          max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size)
    scheme = quantize.Scheme("fp8") if args.keep_fp8 else quantize.Scheme(args.quantize, group_size) if args.quantize else None
    convert(ckpt, args.save_checkpoint_dir, runtime, args.dtype, args.overwrite, scheme)


if __name__ == "__main__":
    run_cli(main)
