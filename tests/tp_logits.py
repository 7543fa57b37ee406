"""Run under torchrun: load a converted checkpoint at TP = world size and save rank 0's logits
for a prefill of 12 tokens followed by 4 single-token decode steps."""

import sys
from pathlib import Path

import torch

from llama.checkpoint import load_converted
from llama.distributed import init_runtime, run_cli

sys.path.insert(0, str(Path(__file__).parent))
from helpers import paged_logits  # noqa: E402


def main() -> None:
    ckpt_dir, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    runtime = init_runtime()
    model, _ = load_converted(ckpt_dir, runtime, torch.float32)
    tokens = torch.randint(0, model.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = paged_logits(model, tokens, prefill=12)
    if runtime.is_main:
        torch.save(logits, out_path)


if __name__ == "__main__":
    run_cli(main)
