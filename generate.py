"""Generate text with a tensor-parallel Llama loaded from a DCP checkpoint.

    torchrun --nproc_per_node K generate.py --converted_ckpt_dir OUT --prompt "The capital of France is"
    torchrun --nproc_per_node 2 generate.py --demo
    torchrun --nproc_per_node K generate.py --converted_ckpt_dir OUT --dialogs dialogs.json
    torchrun --nproc_per_node K generate.py --converted_ckpt_dir OUT --interactive --system "Be brief."
"""

import argparse
import json
import sys
from pathlib import Path

from llama.chat import CHAT_FORMATS, load_dialogs, resolve_chat_format
from llama.checkpoint import DEFAULT_DTYPE, DTYPES, load_converted
from llama.demo import DEMO_PROMPTS, ensure_demo_checkpoint
from llama.completion import complete_dialogs, complete_prompts
from llama.distributed import add_timeout_argument, init_runtime, log, run_cli
from llama.errors import UserError
from llama.engine import Engine, use_compiled_decode
from llama.engine.options import add_engine_arguments, check_engine_arguments, describe_pool, engine_config
from llama.interactive import run_chat


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
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE)
    p.add_argument("--max_seq_len", type=int, help="longest prompt + completion; reserves nothing (default: "
                   "model_args.json)")
    p.add_argument("--max_batch_size", type=int, help="most prompts running at once (default: model_args.json)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start, faster tokens)")
    add_engine_arguments(p)
    add_timeout_argument(p)
    p.add_argument("--echo", action="store_true", help="print each prompt and its completion as one text")
    p.add_argument("--output_json", type=Path, help="also write prompts, tokens, logprobs and texts here")
    p.add_argument("--stream", action="store_true", help="print each completion as it is generated "
                   "(prompts are then decoded one after another)")
    chat = p.add_argument_group("chat")
    chat.add_argument("--dialogs", type=Path, help="JSON list of dialogs, each a list of {\"role\", \"content\"} "
                      "messages (system, then user/assistant turns ending with user): prints the assistant replies")
    chat.add_argument("--interactive", action="store_true", help="chat in the terminal: rank 0 reads, all ranks "
                      "decode, replies stream; /reset, /system TEXT, /exit")
    chat.add_argument("--system", help="system prompt for --interactive, and for dialogs that have none")
    chat.add_argument("--chat_format", choices=CHAT_FORMATS, help="default: the tokenizer's family")
    return p.parse_args()


def check_modes(args: argparse.Namespace) -> None:
    """Reject flags that the chosen mode would silently ignore, and values out of range."""
    check_engine_arguments(args)
    if args.dialogs and args.interactive:
        raise UserError("--dialogs and --interactive are two different modes; pass one of them")
    chat = args.dialogs or args.interactive
    if chat and (args.prompt or args.prompt_file or args.echo):
        raise UserError("--prompt, --prompt_file and --echo are for text completion; drop them with "
                        "--dialogs or --interactive")
    if not chat and (args.system is not None or args.chat_format):
        raise UserError("--system and --chat_format apply to --dialogs or --interactive only")
    if args.interactive and args.output_json:
        raise UserError("--output_json is not written in --interactive mode; use --dialogs to save replies")
    if args.max_gen_len < 1:
        raise UserError(f"--max_gen_len {args.max_gen_len}: generate at least 1 token")
    if args.temperature is not None and args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: use 0 for greedy decoding or a positive value")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p {args.top_p}: use a value in (0, 1]")
    for flag in ("max_seq_len", "max_batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: use a positive number")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        if not args.prompt_file.is_file():
            raise UserError(f"--prompt_file {args.prompt_file}: file not found")
        text = args.prompt_file.read_text()
        if args.prompt_file.suffix == ".json":
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"--prompt_file {args.prompt_file}: not valid JSON ({e})") from None
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
    check_modes(args)
    if not args.demo and not args.converted_ckpt_dir:
        raise UserError("--converted_ckpt_dir is required (or --demo for the built-in example)")
    runtime = init_runtime(timeout_s=args.timeout)
    chat = args.dialogs or args.interactive
    prompts = [] if chat else read_prompts(args)
    dialogs = load_dialogs(args.dialogs) if args.dialogs else []
    if args.demo:
        args.converted_ckpt_dir = ensure_demo_checkpoint(runtime)
        prompts = prompts if prompts or chat else DEMO_PROMPTS
        args.temperature = 0.0 if args.temperature is None else args.temperature
    temperature = 0.6 if args.temperature is None else args.temperature
    dtype = DTYPES[args.dtype]

    model, tokenizer = load_converted(args.converted_ckpt_dir, runtime, dtype, args.model_args, args.tokenizer_path,
                                      args.max_seq_len, args.max_batch_size)
    if args.compile:
        use_compiled_decode(model)
    config = engine_config(args, model)
    log(describe_pool(config, model), file=sys.stderr)  # stdout holds only the completions
    engine = Engine(model, config)
    if args.interactive:
        run_chat(engine, tokenizer, resolve_chat_format(tokenizer, args.chat_format), runtime, args.max_gen_len,
                 temperature, args.top_p, args.seed, args.system)
        return
    sampling = dict(max_gen_len=args.max_gen_len, temperature=temperature, top_p=args.top_p, seed=args.seed,
                    stream=args.stream)
    if dialogs:
        results = complete_dialogs(engine, tokenizer, dialogs, resolve_chat_format(tokenizer, args.chat_format),
                                   args.system, **sampling)
    else:
        results = complete_prompts(engine, tokenizer, prompts, args.echo, **sampling)
    if args.output_json and runtime.is_main:
        args.output_json.write_text(json.dumps({"results": results}, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    run_cli(main)
