"""Generate text with a tensor-parallel Llama loaded from a DCP checkpoint.

    torchrun --nproc_per_node K generate.py --converted_ckpt_dir OUT --prompt "The capital of France is"
    torchrun --nproc_per_node 2 generate.py --demo
"""

import argparse
import json
from pathlib import Path

from llama.checkpoint import DTYPES, load_converted
from llama.demo import DEMO_PROMPTS, ensure_demo_checkpoint
from llama.distributed import default_dtype, init_runtime, log, run_cli
from llama.errors import UserError
from llama.generation import generate


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--converted_ckpt_dir", type=Path, help="output of convert_checkpoints.py")
    p.add_argument("--demo", action="store_true", help="build (once) and run a tiny model trained on a shipped text")
    p.add_argument("--tokenizer_path", type=Path, help="default: the tokenizer.model stored with the checkpoint")
    p.add_argument("--model_args", type=Path, help="default: model_args.json in --converted_ckpt_dir")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    p.add_argument("--prompt_file", type=Path, help="prompts, one per line, or a JSON list of strings")
    p.add_argument("--max_gen_len", type=int, default=64)
    p.add_argument("--temperature", type=float, help="0 is greedy (default 0.6; 0 with --demo)")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16")
    p.add_argument("--max_seq_len", type=int, help="override model_args.json")
    p.add_argument("--max_batch_size", type=int, help="override model_args.json")
    p.add_argument("--echo", action="store_true", help="print each prompt and its completion as one text")
    p.add_argument("--output_json", type=Path, help="also write prompts, tokens, logprobs and texts here")
    return p.parse_args()


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        if not args.prompt_file.is_file():
            raise UserError(f"--prompt_file {args.prompt_file}: file not found")
        text = args.prompt_file.read_text()
        if args.prompt_file.suffix == ".json":
            loaded = json.loads(text)
            if not isinstance(loaded, list) or not all(isinstance(s, str) for s in loaded):
                raise UserError(f"--prompt_file {args.prompt_file}: expected a JSON list of strings")
            prompts += loaded
        else:
            prompts += [line for line in text.splitlines() if line.strip()]
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise UserError(f"prompt {i} is empty; give some text to complete")
    return prompts


def main() -> None:
    args = parse_args()
    if not args.demo and not args.converted_ckpt_dir:
        raise UserError("--converted_ckpt_dir is required (or --demo for the built-in example)")
    runtime = init_runtime()
    prompts = read_prompts(args)
    if args.demo:
        args.converted_ckpt_dir = ensure_demo_checkpoint(runtime)
        prompts = prompts or DEMO_PROMPTS
        args.temperature = 0.0 if args.temperature is None else args.temperature
    temperature = 0.6 if args.temperature is None else args.temperature
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(runtime.device)

    model, tokenizer = load_converted(args.converted_ckpt_dir, runtime, dtype, args.model_args, args.tokenizer_path,
                                      args.max_seq_len, args.max_batch_size)
    prompt_tokens = [tokenizer.encode(p, bos=True) for p in prompts]
    completions = generate(model, prompt_tokens, args.max_gen_len, tokenizer.stop_ids, temperature, args.top_p,
                           args.seed)

    results = []
    for prompt, tokens, completion in zip(prompts, prompt_tokens, completions):
        text = tokenizer.decode(completion.tokens)
        results.append({"prompt": prompt, "prompt_tokens": tokens, "tokens": completion.tokens,
                        "logprobs": completion.logprobs, "text": text})
        log(prompt + text if args.echo else f"> {prompt}\n{text}", end="\n\n")
    if args.output_json and runtime.is_main:
        args.output_json.write_text(json.dumps({"results": results}, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    run_cli(main)
