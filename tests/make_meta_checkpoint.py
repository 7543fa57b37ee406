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
from llama.meta_format import (FP8, FP8_SCALES_FILE, FP8_WEIGHT, INT4_EO8_SCHEME, fp8_scales_key, save_meta_checkpoint,
                               shard_dim)
from llama.quantize import hadamard

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


def symmetric_groups(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's symmetric group rule (get_group_qparams_symmetric, as in the 8da4w quantizer
    Meta used): scale = max |w| of the group / ((2^bits - 1) / 2), q = round(w / scale) in
    [-2^(bits-1), 2^(bits-1) - 1], int8 values and float32 scales (rows, groups)."""
    rows, cols = weight.shape
    groups = weight.float().view(rows, cols // group_size, group_size)
    scales = (groups.abs().amax(-1) / ((2 ** bits - 1) / 2)).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.round(groups / scales[..., None]).clamp(-2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return q.to(torch.int8).view(rows, cols), scales


def write_int4_eo8(state: dict[str, torch.Tensor], args: ModelArgs, out_dir: Path, group_size: int,
                   lora: tuple[int, float] | None = None, spinquant: bool = False) -> dict[str, torch.Tensor]:
    """A Llama 3.2 INT4_EO8 checkpoint (QLoRA with `lora` = (rank, scale), or SpinQuant) of the
    model `state`, in Meta's layout: every block linear int4 in int8 storage with float32 group
    scales and zeros (and bf16 LoRA adaptors), the embedding and output int8 with a float32 scale
    a row, (rows, 1). SpinQuant's w2 holds the rotation its input gets at run time (w2 x H / sqrt(n)).
    Returns the float32 model it stands for, by the same rules, for reference."""
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    shard, reference = {}, {}
    for name, weight in state.items():
        prefix = name.removesuffix("weight")
        if weight.dim() == 1:
            shard[name] = reference[name] = weight.float()
            continue
        if name in ("tok_embeddings.weight", "output.weight"):
            q, scales = symmetric_groups(weight, 8, weight.shape[1])
            shard |= {name: q, prefix + "scales": scales}
            reference[name] = q.float() * scales
            continue
        rotated = spinquant and name.endswith("feed_forward.w2.weight")
        q, scales = symmetric_groups(hadamard(weight) if rotated else weight, 4, group_size)
        shard |= {name: q, prefix + "scales": scales, prefix + "zeros": torch.zeros_like(scales)}
        dequantized = (q.float().view(*scales.shape, group_size) * scales[..., None]).view(weight.shape)
        if lora:
            rank, scale = lora
            a = (torch.randn(rank, weight.shape[1], generator=generator) * 0.1).to(torch.bfloat16)
            b = (torch.randn(weight.shape[0], rank, generator=generator) * 0.1).to(torch.bfloat16)
            shard |= {prefix + "adaptor.A.weight": a, prefix + "adaptor.B.weight": b}
            dequantized = dequantized + scale * (b.float() @ a.float())
        reference[name] = hadamard(dequantized) if rotated else dequantized
    torch.save(shard, out_dir / "consolidated.00.pth")
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
              "ffn_dim_multiplier": args.ffn_dim_multiplier, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
              "use_scaled_rope": args.use_scaled_rope,
              "quantization_args": {"group_size": group_size, "scheme": INT4_EO8_SCHEME, "spinquant": spinquant}}
    if lora:
        params["lora_args"] = {"rank": lora[0], "scale": lora[1]}
    (out_dir / "params.json").write_text(json.dumps(params, indent=2))
    return reference


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
