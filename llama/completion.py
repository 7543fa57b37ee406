"""Text and chat completion as generate.py runs them: encode, generate while printing on
rank 0, and return the records that --output_json writes."""

from __future__ import annotations

from llama.chat import ChatFormat, Dialog, chat_stop_ids, encode_dialogs, with_system
from llama.distributed import log
from llama.engine import Engine
from llama.streaming import print_completions
from llama.tokenizer import Tokenizer


def complete_prompts(engine: Engine, tokenizer: Tokenizer, prompts: list[str], echo: bool, max_gen_len: int,
                     temperature: float, top_p: float, seed: int, stream: bool) -> list[dict]:
    prompt_tokens = [tokenizer.encode(p, bos=True) for p in prompts]
    headers = [p if echo else f"> {p}\n" for p in prompts]
    completions = print_completions(engine, tokenizer, prompt_tokens, headers, max_gen_len, tokenizer.stop_ids,
                                    temperature, top_p, seed, stream)
    return [{"prompt": prompt, "prompt_tokens": tokens, "tokens": c.tokens, "logprobs": c.logprobs,
             "text": tokenizer.decode(c.tokens)} for prompt, tokens, c in zip(prompts, prompt_tokens, completions)]


def complete_dialogs(engine: Engine, tokenizer: Tokenizer, dialogs: list[Dialog], chat_format: ChatFormat,
                     system: str | None, max_gen_len: int, temperature: float, top_p: float, seed: int,
                     stream: bool) -> list[dict]:
    """Reply to each dialog; a refused dialog (Llama 2 control tags in a message) gets an
    "error" record and the others still run."""
    dialogs = [with_system(d, system) for d in dialogs]
    encoded = encode_dialogs(tokenizer, dialogs, chat_format, engine.max_seq_len)
    refused = {i: reason for i, reason in enumerate(encoded) if isinstance(reason, str)}
    for i, reason in refused.items():
        log(f"dialog {i} refused: {reason}", end="\n\n")
    sent = [i for i in range(len(dialogs)) if i not in refused]
    headers = ["".join(f"{m['role']}: {m['content']}\n" for m in dialogs[i]) + "assistant: " for i in sent]
    completions = dict(zip(sent, print_completions(engine, tokenizer, [encoded[i] for i in sent], headers,
                                                   max_gen_len, chat_stop_ids(tokenizer, chat_format),
                                                   temperature, top_p, seed, stream)))
    return [{"dialog": dialog, "prompt_tokens": [], "tokens": [], "logprobs": [], "text": "", "error": refused[i]}
            if i in refused else
            {"dialog": dialog, "prompt_tokens": encoded[i], "tokens": completions[i].tokens,
             "logprobs": completions[i].logprobs, "text": tokenizer.decode(completions[i].tokens)}
            for i, dialog in enumerate(dialogs)]
