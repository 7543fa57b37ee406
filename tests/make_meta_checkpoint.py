"""Checkpoints in Meta's layouts, from random weights: the tests' miniatures of every format
Meta ships, and (run as a script) a random checkpoint of a real Llama shape for measuring
conversion and loading at realistic sizes without downloading weights:

    python tests/make_meta_checkpoint.py --shape llama3.2-1b --n_shards 2 --tokenizer_path T OUT

The variants apply Meta's own rules (llama-models' quantization code and the fbgemm kernels it
calls) to a bf16 checkpoint written by llama.meta_format.save_meta_checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from llama.args import ModelArgs
from llama.benchmarking import SHAPES
from llama.meta_format import FP8, FP8_SCALES_FILE, FP8_WEIGHT, fp8_scales_key, save_meta_checkpoint, shard_dim

FP8_MAX = torch.finfo(FP8).max  # 448


def shard_paths(meta_dir: Path) -> list[Path]:
    return sorted(meta_dir.glob("consolidated.*.pth"))


def fp8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's FP8 rule (fbgemm's quantize_fp8_per_row): each row scaled so its largest magnitude
    is e4m3's largest value, 448; float32 scales, one a row."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


def to_fp8(meta_dir: Path, n_layers: int) -> None:
    """Rewrite a bf16 Meta checkpoint as Llama 3.1 405B's FP8 download: in every layer but the
    first and the last, w1/w3/w2 of each shard quantized row-wise on that shard's own slice,
    the scales in fp8_scales_r.pt keyed "{layer}_feed_forward.{w}_{r}"."""
    for index, path in enumerate(shard_paths(meta_dir)):
        shard, scales = torch.load(path, weights_only=True), {}
        for name in list(shard):
            match = FP8_WEIGHT.fullmatch(name)
            if match and 0 < int(match[1]) < n_layers - 1:
                shard[name], scales[fp8_scales_key(name, index)] = fp8_rowwise(shard[name])
        torch.save(shard, path)
        torch.save(scales, meta_dir / FP8_SCALES_FILE.format(index))


def fp8_dequantized_state(meta_dir: Path) -> dict[str, torch.Tensor]:
    """The whole float32 model an FP8 checkpoint stands for, by Meta's rule (fp8 value x its
    row's scale, each shard with its own scales), merged along fairscale's split of each weight."""
    shards = []
    for index, path in enumerate(shard_paths(meta_dir)):
        shard = torch.load(path, weights_only=True)
        scales = torch.load(meta_dir / FP8_SCALES_FILE.format(index), weights_only=True)
        shards.append({name: t.float() * scales[fp8_scales_key(name, index)][:, None] if t.dtype == FP8 else t.float()
                       for name, t in shard.items()})
    embedding_dim = 1 if "rope.freqs" in shards[0] else 0
    merged = {}
    for name in shards[0]:
        dim = shard_dim(name, embedding_dim)
        merged[name] = shards[0][name] if dim is None or name == "rope.freqs" else torch.cat([s[name] for s in shards], dim)
    return merged


def kv_heads_duplicated(state: dict[str, torch.Tensor], args: ModelArgs, copies: int) -> tuple[dict, ModelArgs]:
    """Llama 3.1 405B MP16's layout: each KV head repeated `copies` times in a row (wk/wv), and
    params.json counting the copies as heads, so each of n_kv_heads x copies shards holds one."""
    def repeated(weight: torch.Tensor) -> torch.Tensor:
        return weight.view(args.n_kv_heads, -1, weight.shape[1]).repeat_interleave(copies, 0).flatten(0, 1)

    out = {name: repeated(t) if name.endswith(("attention.wk.weight", "attention.wv.weight")) else t
           for name, t in state.items()}
    return out, ModelArgs(**{**vars(args), "n_kv_heads": args.n_kv_heads * copies})


def edit_params(meta_dir: Path, **changes: object) -> None:
    path = meta_dir / "params.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--shape", choices=SHAPES, required=True)
    p.add_argument("--n_shards", type=int, default=1)
    p.add_argument("--fp8", action="store_true", help="Llama 3.1 405B's FP8 layout (w1/w3/w2 of inner layers)")
    p.add_argument("--tokenizer_path", type=Path, required=True, help="a tokenizer with the shape's vocabulary")
    args = p.parse_args()
    model_args = ModelArgs(**SHAPES[args.shape])
    generator = torch.Generator().manual_seed(0)
    state = {name: (torch.ones(shape) if len(shape) == 1 else torch.empty(shape).uniform_(-0.02, 0.02, generator=generator))
             .to(torch.bfloat16) for name, shape in model_args.weight_shapes().items()}
    save_meta_checkpoint(state, model_args, args.out_dir, n_shards=args.n_shards, llama2_layout=model_args.vocab_size == 32000)
    if args.fp8:
        to_fp8(args.out_dir, model_args.n_layers)
    shutil.copyfile(args.tokenizer_path, args.out_dir / "tokenizer.model")


if __name__ == "__main__":
    main()
