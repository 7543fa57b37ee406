"""Meta's fairscale layout: writing it (what the demo and the tests feed to the converter), and
reading the variants Meta ships besides bf16 shards.

Meta saves model-parallel rank r's slice of every weight in consolidated.0r.pth: column-
parallel weights split by rows, row-parallel ones by columns, norms whole in every file,
the embedding split by columns (Llama 2's ParallelEmbedding) or by rows (Llama 3's
VocabParallelEmbedding).

Variants (layouts as Meta's llama-models writes and reads them):
- Llama 3.1 405B FP8: in every layer but the first and the last, feed_forward.w1/w3/w2 are
  float8_e4m3fn, and fp8_scales_r.pt beside consolidated.0r.pth maps
  "{layer}_feed_forward.{w1|w3|w2}_{r}" to float32 scales, one per row of shard r's slice
  (each shard quantized on its own: weight = fp8 value x its row's scale). w2 is split by
  columns, so its shards scale the same row differently.
- Llama 3.1 405B bf16 MP16: 16 shards, params.json says n_kv_heads 16, but the model has 8:
  each KV head is stored in 2 consecutive shards, one per fairscale rank that needed it.
- Llama 3.2 1B/3B SpinQuant and QLoRA (INT4_EO8): one shard; params.json has
  "quantization_args" {"scheme": "int4_weight_int8_dynamic_activation", "group_size", "spinquant"}
  and, for QLoRA, "lora_args" {"rank", "scale"}. Every block linear is torchao's
  Int8DynActInt4WeightLinear: `weight` int8 (out, in) holding int4 values in [-8, 7], `scales`
  float32 (out, in / group_size), `zeros` (same; absent means 0): w = (q - zero) x scale; QLoRA
  adds `adaptor.A.weight` (rank, in) and `adaptor.B.weight` (out, rank), added as
  scale x B (A x). The embedding and the output are int8 with one float scale a row
  (`scales` (rows, 1)), which Meta's loader multiplies out at load.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from llama import quantize
from llama.args import ModelArgs
from llama.errors import UserError

ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
FP8 = torch.float8_e4m3fn
FP8_SCALES_FILE = "fp8_scales_{}.pt"
FP8_WEIGHT = re.compile(r"layers\.(\d+)\.feed_forward\.(w[123])\.weight")
KV_PROJECTIONS = ("attention.wk.weight", "attention.wv.weight")
INT4_EO8_SCHEME = "int4_weight_int8_dynamic_activation"
# The tensors an INT4_EO8 weight `<layer>.weight` has beside it.
INT4_EO8_PARTS = ("scales", "zeros", "adaptor.A.weight", "adaptor.B.weight")


@dataclass(frozen=True)
class Int4EO8:
    """params.json's quantization_args and lora_args of a Llama 3.2 quantized checkpoint."""

    group_size: int
    lora_rank: int | None
    lora_scale: float
    spinquant: bool

    @property
    def scheme(self) -> quantize.Scheme:
        return quantize.Scheme("int4", self.group_size, meta_eo8=True, lora_rank=self.lora_rank,
                               spinquant=self.spinquant)


def read_int4_eo8(params_path: Path) -> Int4EO8 | None:
    """The INT4_EO8 arguments of params.json, None when it has no quantization_args."""
    params = json.loads(params_path.read_text())
    args = params.get("quantization_args")
    if args is None:
        return None
    # llama-models names one scheme; a file that leaves it out can mean no other.
    scheme = args.get("scheme", INT4_EO8_SCHEME) if isinstance(args, dict) else args
    if scheme != INT4_EO8_SCHEME:
        raise UserError(f'{params_path}: quantization_args scheme "{scheme}" is unknown; this converter reads '
                        f'Meta\'s Llama 3.2 quantized checkpoints ("{INT4_EO8_SCHEME}")')
    group_size = args.get("group_size")
    if group_size not in quantize.GROUP_SIZES:
        raise UserError(f"{params_path}: quantization_args group_size {group_size}: the int4 kernels take "
                        f"{', '.join(map(str, quantize.GROUP_SIZES))}")
    lora = params.get("lora_args")
    if lora is not None and not (isinstance(lora, dict) and isinstance(lora.get("rank"), int)
                                 and isinstance(lora.get("scale"), (int, float))):
        raise UserError(f'{params_path}: lora_args {lora}: expected {{"rank": <int>, "scale": <number>}}')
    return Int4EO8(group_size, lora["rank"] if lora else None, float(lora["scale"]) if lora else 1.0,
                   bool(args.get("spinquant", False)))


def check_int4_eo8(path: Path, shard: dict[str, torch.Tensor], args: ModelArgs, eo8: Int4EO8) -> None:
    """Every INT4_EO8 tensor of the shard has the dtype and shape Meta's loader expects."""
    scheme = eo8.scheme
    for name, (rows, cols) in ((n, s) for n, s in args.weight_shapes().items() if len(s) == 2):
        if name not in shard and name == "output.weight":
            continue  # tied: the embedding's
        prefix = name.removesuffix("weight")
        if not quantize.quantizes(scheme, name, args.n_layers):  # the embedding, the output
            expected = {name: ((rows, cols), (torch.int8,)), prefix + "scales": ((rows, 1), None)}
        else:
            groups = (rows, cols // eo8.group_size)
            expected = {name: ((rows, cols), (torch.int8,)), prefix + "scales": (groups, None),
                        prefix + "zeros": (groups, None)}
            if eo8.lora_rank:
                expected |= {prefix + "adaptor.A.weight": ((eo8.lora_rank, cols), None),
                             prefix + "adaptor.B.weight": ((rows, eo8.lora_rank), None)}
        for key, (shape, dtypes) in expected.items():
            if key not in shard:
                if key.endswith("zeros"):
                    continue  # left out: 0
                raise UserError(f"{path}: no {key}, which Meta's INT4_EO8 layout has; is params.json's "
                                "quantization_args from this checkpoint?")
            t = shard[key]
            found = tuple(t.shape)
            if found != shape and not (key.endswith("scales") and shape[1] == 1 and found == shape[:1]):
                raise UserError(f"{path}: {key} has shape {list(found)}, expected {list(shape)} for group size "
                                f"{eo8.group_size}; is params.json's quantization_args from this checkpoint?")
            if dtypes and t.dtype not in dtypes or not dtypes and not t.is_floating_point():
                raise UserError(f"{path}: {key} is {str(t.dtype).removeprefix('torch.')}, not what Meta's INT4_EO8 "
                                "layout holds there; re-download it")


def is_kv_projection(name: str) -> bool:
    return name.endswith(KV_PROJECTIONS)


def fp8_scales_key(name: str, shard: int) -> str:
    """The key of an FP8 weight's row scales in fp8_scales_{shard}.pt."""
    layer, weight = FP8_WEIGHT.fullmatch(name).groups()
    return f"{layer}_feed_forward.{weight}_{shard}"


def read_fp8_scales(paths: list[Path], shards: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]] | None:
    """Per shard, each FP8 weight's float32 row scales from the fp8_scales_r.pt beside it
    (memory-mapped), checked against the weight; None when no weight is FP8."""
    if not any(t.dtype == FP8 for shard in shards for t in shard.values()):
        return None
    out = []
    for index, (path, shard) in enumerate(zip(paths, shards)):
        scales_path = path.with_name(FP8_SCALES_FILE.format(index))
        if not scales_path.is_file():
            raise UserError(f"{scales_path}: missing; the FP8 weights of {path.name} are scaled by it (Meta's FP8 "
                            "download has one fp8_scales_r.pt per shard): download it beside the shards")
        try:
            scales = torch.load(scales_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for truncated or foreign files
            raise UserError(f"{scales_path}: not a readable PyTorch file ({type(e).__name__}); re-download it") from None
        if not isinstance(scales, dict):
            raise UserError(f"{scales_path}: holds a {type(scales).__name__}, not Meta's dict of row scales; "
                            "re-download it")
        found = {}
        for name, weight in shard.items():
            if weight.dtype != FP8:
                continue
            if not FP8_WEIGHT.fullmatch(name):
                raise UserError(f"{path}: {name} is FP8, but Meta's FP8 checkpoints quantize only the layers' "
                                "feed_forward.w1/w3/w2; is this file from Meta's download?")
            key = fp8_scales_key(name, index)
            rows = weight.shape[0]
            if key not in scales:
                raise UserError(f"{scales_path}: no scales \"{key}\" for the FP8 {name} of {path.name}; re-download it")
            if not isinstance(scales[key], torch.Tensor) or tuple(scales[key].shape) != (rows,):
                shape = list(scales[key].shape) if isinstance(scales[key], torch.Tensor) else type(scales[key]).__name__
                raise UserError(f"{scales_path}: \"{key}\" has shape {shape}, but {name} in {path.name} has {rows} "
                                f"rows (one scale each); are the scales from the same download as the shards?")
            found[name] = scales[key].float()
        out.append(found)
    return out


def kv_head_duplicates(args: ModelArgs, shards: list[dict[str, torch.Tensor]]) -> int:
    """How many consecutive shards hold each KV head: 1, or more where Meta stored each of
    the model's heads in several shards (405B MP16) and params.json counts the copies. Told by
    the first layer's wk (distinct heads are never equal); every copy of every layer is
    checked as it is read (MetaCheckpoint.slice)."""
    count, key = len(shards), "layers.0.attention.wk.weight"
    if count == 1 or args.n_kv_heads != count or key not in shards[0]:
        return 1
    for run in sorted((d for d in range(2, count + 1) if count % d == 0), reverse=True):
        if all(torch.equal(shards[i][key], shards[i - i % run][key]) for i in range(count)):
            return run
    return 1


def shard_dim(name: str, embedding_dim: int) -> int | None:
    """The dimension fairscale splits `name` along, or None for a replicated weight."""
    if name == "tok_embeddings.weight":
        return embedding_dim
    if name.endswith("norm.weight"):
        return None
    return 1 if name.endswith(ROW_PARALLEL) else 0


def save_meta_checkpoint(state: dict[str, torch.Tensor], args: ModelArgs, out_dir: Path, n_shards: int = 1,
                         llama2_layout: bool = True, tied_output: bool = False) -> None:
    """Write `state` (full weights, Meta names) as params.json + consolidated.XX.pth.

    llama2_layout: embedding split by columns, `rope.freqs` stored, vocab_size -1 in
    params.json; otherwise the Llama 3 layout. tied_output: leave out output.weight."""
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": -1 if llama2_layout else args.vocab_size, "multiple_of": args.multiple_of,
              "ffn_dim_multiplier": args.ffn_dim_multiplier, "norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "use_scaled_rope": args.use_scaled_rope}
    (out_dir / "params.json").write_text(json.dumps(params, indent=2))
    embedding_dim = 1 if llama2_layout else 0
    for rank in range(n_shards):
        shard = {}
        for name, tensor in state.items():
            if tied_output and name == "output.weight":
                continue
            dim = shard_dim(name, embedding_dim)
            shard[name] = tensor.clone() if dim is None else tensor.chunk(n_shards, dim)[rank].clone()
        if llama2_layout:
            shard["rope.freqs"] = torch.zeros(args.head_dim // 2)
        torch.save(shard, out_dir / f"consolidated.{rank:02d}.pth")
