"""Run under torchrun: load a converted checkpoint at TP = world size and save rank 0's logits
for a prefill of 12 tokens followed by 4 single-token decode steps."""

import sys
from pathlib import Path

import torch

from llama.checkpoint import load_converted
from llama.distributed import init_runtime, run_cli


def main() -> None:
    ckpt_dir, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    runtime = init_runtime()
    model, _ = load_converted(ckpt_dir, runtime, torch.float32)
    tokens = torch.randint(0, model.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model.setup_caches(2)
    with torch.inference_mode():
        logits = [model(tokens[:, :12], all_logits=True)]
        logits += [model.decode(tokens[:, i], torch.full((2,), i))[:, None] for i in range(12, 16)]
    if runtime.is_main:
        torch.save(torch.cat(logits, dim=1), out_path)


if __name__ == "__main__":
    run_cli(main)
