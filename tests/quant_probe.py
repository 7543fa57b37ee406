"""Run under torchrun: load each converted checkpoint given at TP = world size and save, from
rank 0, what tests/test_quantize.py compares: the dequantized weights as DCP resharded them
(before packing for the kernels), the greedy tokens of a few prompts and their log-probabilities, and optionally the
perplexity of the demo text, or the float32 logits of a fixed prompt's every position.

    quant_probe.py OUT.pt DTYPE [--weights] [--perplexity] [--logits] CKPT...
"""

import argparse
import math
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from llama import quantize
from llama.args import ModelArgs
from llama.checkpoint import ARGS_FILE, DTYPES, TOKENIZER_FILE
from llama.demo import DEMO_PROMPTS, TEXT_PATH, TRAIN_WINDOW
from llama.distributed import init_runtime, run_cli
from llama.engine import Engine, generate
from llama.parallel import build_sharded
from llama.tokenizer import Tokenizer


def dequantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized weight, whole, as the loaded shards stand for it."""
    out = {}
    for name, module in model.named_modules():
        if getattr(module, "scheme", None):
            zeros = module.zeros.full_tensor() if module.scheme.name == "int4" else None
            out[name] = quantize.dequantize(module.weight.full_tensor(), module.scales.full_tensor(), zeros)
    return out


@torch.inference_mode()
def perplexity(model: torch.nn.Module, tokenizer: Tokenizer) -> float:
    """Of the demo text, in windows shaped like the demo's training batches (BOS + 128 tokens)."""
    text = tokenizer.encode(TEXT_PATH.read_text(), bos=False, eos=False)
    windows = torch.tensor([[tokenizer.bos_id] + text[i:i + TRAIN_WINDOW]
                            for i in range(0, len(text) - TRAIN_WINDOW + 1, TRAIN_WINDOW)])
    logits = model(windows[:, :-1], all_logits=True)
    return math.exp(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("dtype", choices=DTYPES)
    p.add_argument("--weights", action="store_true")
    p.add_argument("--perplexity", action="store_true")
    p.add_argument("--logits", action="store_true")
    p.add_argument("ckpts", type=Path, nargs="+")
    opts = p.parse_args()
    runtime = init_runtime()
    results = {}
    for ckpt in opts.ckpts:
        args = ModelArgs.load(ckpt / ARGS_FILE)
        tokenizer = Tokenizer(ckpt / TOKENIZER_FILE)
        model = build_sharded(args, runtime.mesh, runtime.device, DTYPES[opts.dtype])
        dcp.load(model.state_dict(), checkpoint_id=ckpt)
        result = {"weights": dequantized_weights(model)} if opts.weights else {}
        quantize.pack_for_device(model)
        model.eval()
        if opts.perplexity:
            result["perplexity"] = perplexity(model, tokenizer)
        prompts = [tokenizer.encode(p, bos=True, eos=False) for p in DEMO_PROMPTS]
        if opts.logits:
            with torch.inference_mode():
                result["logits"] = model(torch.tensor([prompts[0]]), all_logits=True)[0]
        completions = generate(Engine(model), prompts, 12, frozenset(), temperature=0.0)
        result["tokens"], result["logprobs"] = [c.tokens for c in completions], [c.logprobs for c in completions]
        results[str(ckpt)] = result
    if runtime.is_main:
        torch.save(results, opts.out)


if __name__ == "__main__":
    run_cli(main)
