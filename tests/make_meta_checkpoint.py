"""Write a random checkpoint of a real Llama shape in Meta's format, for measuring conversion
and loading at realistic sizes without downloading weights:

    python tests/make_meta_checkpoint.py --shape llama3.2-1b --n_shards 2 --tokenizer_path T OUT
"""

import argparse
import shutil
from pathlib import Path

import torch

from llama.args import ModelArgs
from llama.benchmarking import SHAPES
from llama.meta_format import save_meta_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--shape", choices=SHAPES, required=True)
    p.add_argument("--n_shards", type=int, default=1)
    p.add_argument("--tokenizer_path", type=Path, required=True, help="a tokenizer with the shape's vocabulary")
    args = p.parse_args()
    model_args = ModelArgs(**SHAPES[args.shape])
    generator = torch.Generator().manual_seed(0)
    state = {name: (torch.ones(shape) if len(shape) == 1 else torch.empty(shape).uniform_(-0.02, 0.02, generator=generator))
             .to(torch.bfloat16) for name, shape in model_args.weight_shapes().items()}
    save_meta_checkpoint(state, model_args, args.out_dir, n_shards=args.n_shards, llama2_layout=model_args.vocab_size == 32000)
    shutil.copyfile(args.tokenizer_path, args.out_dir / "tokenizer.model")


if __name__ == "__main__":
    main()
