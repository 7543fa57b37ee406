"""Quantized linear weights: int8 and int4 (weight-only), and FP8 as Meta ships Llama 3.1 405B.
The stored format, and the kernels that use it.

Which weights: int8 and int4, every linear layer of the blocks and the output projection;
fp8, the feed-forward w1/w3/w2 of every layer but the first and the last (Meta's choice, kept
as the download has it). The embedding stays in the checkpoint's dtype (a step reads one row
of it per token), and so do the norms and every weight a scheme leaves out.

Stored format (what convert_checkpoints.py writes into DCP, the same for every device and
TP degree; each tensor a DTensor, so DCP reshards it like any other weight):
- int8: `<layer>.weight` int8 (out, in) and `<layer>.scales` (out,), symmetric per output
  row: w = q * scale, q in [-127, 127], scale = max |w| / 127 over the whole row.
- int4: `<layer>.weight` uint8 (out, in / 2), two values a byte (the even column in the high
  nibble), `<layer>.scales` and `<layer>.zeros` (out, in / group_size), asymmetric per group of
  `group_size` consecutive inputs: w = (q - 8) * scale + zero, q in [0, 15].
- fp8: `<layer>.weight` float8_e4m3fn (out, in) and `<layer>.scales` float32 (out,), per
  output row: w = q * scale, scale = max |w| / 448 over the row (Meta's rule). Converted from
  Meta's shards, w1/w3 rows keep the scales their shard gave them; w2 (whose shards scale parts
  of a row differently) is dequantized and requantized per whole row.
- int4_eo8 (Meta's Llama 3.2 SpinQuant/QLoRA): int4's layout with Meta's float32 scales and
  zeros, the output projection unquantized, and for QLoRA `<layer>.adaptor_a` (rank, in) and
  `<layer>.adaptor_b` (out, rank) in the checkpoint's dtype: y = W x + B (A x).
Scales and zeros of int8/int4 are stored in the checkpoint's dtype and quantization rounds to them. Each
scale depends only on its own row (int8) or group (int4), never on how the weight is split,
so every conversion world size writes the same bytes; a row-parallel rank reads only its
part of the row, and an int4 group never straddles ranks (check_tp_degree).

At load time `pack_for_device` turns each rank's local shards into the operands of the kernel
for the device in use, wq/wk/wv and w1/w3 fused into one product each. CPUs:
llama.cpu_linear's kernels (cpu_linear.c), which take the stored values as they are, where a C
compiler is found; else PyTorch's `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu` (its own packed layout). CUDA: `_weight_int4pack_mm` (another
packed layout) for int4; int8 multiplies by the weight converted inside the step, which
torch.compile fuses into the product (gpt-fast's approach). fp8: `torch._scaled_mm` on GPUs with
FP8 matrix products (compute capability 8.9 and up: Hopper, Ada) in bfloat16, the activations
quantized per token (row-wise absmax, bounded by 1200) as Meta's reference does; everywhere
else the weights are dequantized once at load to the compute dtype.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from llama import cpu_linear
from llama.args import ModelArgs
from llama.errors import UserError

SCHEMES = ("int8", "int4", "fp8", "int4_eo8")
# What convert_checkpoints.py --quantize makes of any weights; fp8 and int4_eo8 come only from
# Meta's files (Llama 3.1 405B FP8, Llama 3.2 SpinQuant/QLoRA INT4_EO8).
QUANTIZE_CHOICES = ("int8", "int4")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# Meta's reference clamps each token's largest activation to this before scaling it to FP8
# (llama-models' fp8_activation_scale_ub).
FP8_ACTIVATION_BOUND = 1200.0
FP8_LINEAR = re.compile(r"layers\.(\d+)\.feed_forward\.w[123]\.weight")
GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept
DEFAULT_GROUP_SIZE = 128
EMBEDDING = "tok_embeddings.weight"
# torch's CPU int4 packing takes rows in multiples of this; smaller shards are padded.
INT4_CPU_ROW_MULTIPLE = 16
# ... and lays rows out in blocks of 32 (AVX2) or 64 (AVX-512): packing a multiple of that at
# a time gives the same bytes while the int32 copy it needs stays small.
INT4_CPU_PACK_ROWS = 4096
# Rows quantized at once during conversion: bounds the float32 working copy (a few tens of MB).
QUANTIZE_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class Scheme:
    """How a checkpoint's linear weights are quantized (None in ModelArgs: not at all)."""

    name: str  # "int8", "int4" or "fp8"
    group_size: int | None = None  # int4 only
    # Meta's Llama 3.2 INT4_EO8 weights (model_args.json's "int4_eo8"): int4 block linears with
    # Meta's float32 scales and zeros, the output projection left in the checkpoint's dtype,
    # and, for QLoRA, LoRA adaptors of this rank on every quantized linear.
    meta_eo8: bool = False
    lora_rank: int | None = None
    # SpinQuant: w2's input is rotated by a normalized Hadamard matrix at run time (R4; the
    # stored w2 has the rotation folded in), as ExecuTorch runs these checkpoints.
    spinquant: bool = False

    def describe(self) -> str:
        if self.name != "int4":
            return self.name
        extra = f" with LoRA rank {self.lora_rank}" if self.lora_rank else " with SpinQuant" if self.spinquant else ""
        meta = f", Meta's INT4_EO8{extra}" if self.meta_eo8 else ""
        return f"int4 (group size {self.group_size}{meta})"

    def record(self, args: ModelArgs) -> None:
        """Write this scheme into `args` (model_args.json's fields)."""
        args.quantize = "int4_eo8" if self.meta_eo8 else self.name
        args.group_size, args.lora_rank, args.spinquant = self.group_size, self.lora_rank, self.spinquant


def scheme_of(args: ModelArgs) -> Scheme | None:
    if args.quantize == "int4_eo8":
        return Scheme("int4", args.group_size, meta_eo8=True, lora_rank=args.lora_rank, spinquant=args.spinquant)
    return Scheme(args.quantize, args.group_size) if args.quantize else None


def check_args(args: ModelArgs, source: str) -> None:
    """Reject a model_args.json whose "quantize" and "group_size" name no scheme of ours."""
    check_scheme(args.quantize, args.group_size, f'{source}: "quantize"', f'{source}: "group_size"', SCHEMES)


def check_scheme(quantize: str | None, group_size: int | None, scheme_label: str = "--quantize",
                 group_label: str = "--group_size", choices: tuple[str, ...] = QUANTIZE_CHOICES) -> None:
    """Reject an unknown scheme or group size; the labels name the flags or fields given."""
    if quantize is not None and quantize not in choices:
        raise UserError(f"{scheme_label} {quantize}: unknown quantization; choose "
                        f"{', '.join(choices[:-1])} or {choices[-1]}")
    int4 = quantize in ("int4", "int4_eo8")
    if not int4 and group_size is not None:
        raise UserError(f"{group_label} {group_size}: a group size applies to int4 quantization only")
    if int4 and group_size not in GROUP_SIZES:
        raise UserError(f"{group_label} {group_size}: int4 group sizes are {', '.join(map(str, GROUP_SIZES))}")


def quantizes(scheme: Scheme | None, name: str, n_layers: int) -> bool:
    """Whether `scheme` stores the weight `name` (Meta's name) quantized: int8/int4 every linear
    weight (not the embedding, not the norms), fp8 the feed-forward of the inner layers."""
    if scheme is None or name == EMBEDDING or name.endswith("norm.weight"):
        return False
    if scheme.name != "fp8":
        return not (scheme.meta_eo8 and name == "output.weight")
    match = FP8_LINEAR.fullmatch(name)
    return bool(match) and 0 < int(match[1]) < n_layers - 1


def input_widths(args: ModelArgs) -> dict[str, int]:
    """Input width of each kind of quantized weight (their name after `layers.N.`)."""
    return {"attention.wq/wk/wv, feed_forward.w1/w3, output": args.dim,
            "attention.wo": args.n_heads * args.head_dim, "feed_forward.w2": args.ffn_hidden_dim}


def working_group_sizes(widths: list[int]) -> list[int]:
    return [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]


def check_group_size(args: ModelArgs, group_size: int, flag: str) -> None:
    """Conversion: every input width must be a whole number of groups."""
    widths = input_widths(args)
    bad = {name: w for name, w in widths.items() if w % group_size}
    if bad:
        name, width = next(iter(bad.items()))
        works = working_group_sizes(list(widths.values()))
        hint = f"use {' or '.join(map(str, works))}" if works else "no int4 group size fits this model; use int8"
        raise UserError(f"{flag} {group_size} does not divide the input width {width} of {name}; {hint}")


def check_tp_degree(args: ModelArgs, tp: int) -> None:
    """Loading int4 at TP degree `tp`: the row-parallel layers (wo, w2) hold 1/tp of each row,
    which must be whole groups."""
    scheme = scheme_of(args)
    if not scheme or scheme.name != "int4":
        return
    local = {"attention.wo": args.n_heads * args.head_dim // tp, "feed_forward.w2": args.ffn_hidden_dim // tp}
    bad = {name: w for name, w in local.items() if w % args.group_size}
    if bad:
        name, width = next(iter(bad.items()))
        works = working_group_sizes([args.dim, *local.values()])
        hint = (f"re-convert with --group_size {works[-1]}" if works
                else "no int4 group size fits this degree: use fewer ranks, or int8")
        raise UserError(f"tensor-parallel degree {tp} leaves {width} inputs of {name} per rank, not a multiple of "
                        f"the checkpoint's int4 group size {args.group_size}; {hint}")


def layer_tensors(scheme: Scheme, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """The stored tensors of one quantized (rows, cols) linear weight: attribute name ->
    (shape, dtype), where None stands for the floating-point dtype of the checkpoint."""
    if scheme.name == "int8":
        return {"weight": ((rows, cols), torch.int8), "scales": ((rows,), None)}
    if scheme.name == "fp8":
        return {"weight": ((rows, cols), FP8), "scales": ((rows,), torch.float32)}
    groups = (rows, cols // scheme.group_size)
    scale_dtype = torch.float32 if scheme.meta_eo8 else None
    tensors = {"weight": ((rows, cols // 2), torch.uint8), "scales": (groups, scale_dtype), "zeros": (groups, scale_dtype)}
    if scheme.lora_rank:  # x -> B (A x), the LoRA scale folded into B
        tensors |= {"adaptor_a": ((scheme.lora_rank, cols), None), "adaptor_b": ((rows, scheme.lora_rank), None)}
    return tensors


def stored_bytes(scheme: Scheme, rows: int, cols: int, element_size: int) -> int:
    """Bytes of a quantized (rows, cols) weight's stored tensors, scales of `element_size`."""
    return sum(math.prod(shape) * (dtype.itemsize if dtype else element_size)
               for shape, dtype in layer_tensors(scheme, rows, cols).values())


def stored_tensors(args: ModelArgs) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Every tensor a checkpoint of `args` holds: name -> (shape, dtype), None for floats."""
    scheme = scheme_of(args)
    out: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for name, shape in args.weight_shapes().items():
        if not quantizes(scheme, name, args.n_layers):
            out[name] = (shape, None)
        else:
            prefix = name.removesuffix("weight")
            out |= {prefix + key: spec for key, spec in layer_tensors(scheme, *shape).items()}
    return out


# ---------------------------------------------------------------------------------------
# Quantizing and dequantizing (conversion, tests)


def quantize(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored tensors of one weight (out, in), keyed `weight`, `scales`[, `zeros`],
    computed in float32 a block of rows at a time."""
    rows_per_chunk = max(1, QUANTIZE_CHUNK_ELEMENTS // weight.shape[1])
    parts = [_quantize_rows(weight[i:i + rows_per_chunk].float(), scheme, scale_dtype)
             for i in range(0, weight.shape[0], rows_per_chunk)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _quantize_rows(w: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if scheme.name == "fp8":  # float32 scales whatever the checkpoint's dtype, as Meta's
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
        return {"weight": (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), "scales": scales}
    if scheme.name == "int8":
        amax = w.abs().amax(dim=1)
        scales = torch.where(amax > 0, amax / 127, 1.0).to(scale_dtype)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return {"weight": q, "scales": scales}
    rows, cols = w.shape
    groups = w.view(rows, cols // scheme.group_size, scheme.group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    # The scale and zero are rounded to their stored dtype first, and the values fitted to them.
    scales = ((hi - lo) / 15).to(scale_dtype)
    zeros = (lo + 8 * scales.float()).to(scale_dtype)
    s = scales.float()
    q = torch.round((groups - zeros.float()[..., None]) / torch.where(s > 0, s, 1.0)[..., None] + 8).clamp(0, 15)
    return {"weight": pack_int4(q.view(rows, cols).to(torch.uint8)), "scales": scales, "zeros": zeros}


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(rows, cols) values in [0, 15] -> (rows, cols / 2) bytes, the even column in the high
    nibble (the layout torch's CUDA packing takes as it is)."""
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed >> 4, packed & 15), dim=-1).flatten(-2)


def dequantize(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight (out, in) that stored tensors stand for."""
    if zeros is None:
        return weight.float() * scales.float()[:, None]
    q = unpack_int4(weight).float()
    group_size = q.shape[1] // scales.shape[1]
    expand = functools.partial(torch.repeat_interleave, repeats=group_size, dim=1)
    return (q - 8) * expand(scales.float()) + expand(zeros.float())


# ---------------------------------------------------------------------------------------
# Kernel operands and products (loading, forward)


def kernel_operands(scheme: Scheme, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's stored shards (plain tensors on the target device) -> (weight, scales) in
    the layout of the device's kernel: llama.cpu_linear's where it builds (the stored values, int8's
    columns in cpu_linear.int8_order, and the scales as they are), else torch's (scales in the
    compute dtype). fp8: the stored tensors where `torch._scaled_mm` runs them, else the weight
    dequantized to `dtype` (scales None)."""
    if scheme.name == "fp8":
        if fp8_products(weight.device, dtype):
            return weight.contiguous(), scales.float().contiguous()
        return (weight.float() * scales.float()[:, None]).to(dtype), None
    if _uses_cpu_linear(weight):  # scales as stored (bf16 or float32: what the kernel reads)
        scale_dtype = scales.dtype if scales.dtype in (torch.bfloat16, torch.float32) else torch.float32
        if scheme.name == "int8":
            return weight[:, cpu_linear.int8_order(weight.shape[1])], scales.to(scale_dtype).contiguous()
        return weight.contiguous(), torch.stack((scales, zeros), dim=-1).to(scale_dtype).contiguous()
    if scheme.name == "int8":
        return weight.contiguous(), scales.to(dtype).contiguous()
    rows = weight.shape[0]
    scales_and_zeros = torch.stack((scales, zeros), dim=-1).to(dtype)  # (rows, groups, 2)
    if weight.device.type == "cuda":
        packed = torch.ops.aten._convert_weight_to_int4pack(weight.contiguous(), _inner_k_tiles(weight.shape[1] * 2))
    else:
        pad = -rows % INT4_CPU_ROW_MULTIPLE
        if pad:
            weight = F.pad(weight, (0, 0, 0, pad), value=0x88)  # zero weights: q = 8, scale and zero 0
            scales_and_zeros = F.pad(scales_and_zeros, (0, 0, 0, 0, 0, pad))
        packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            unpack_int4(weight[i:i + INT4_CPU_PACK_ROWS]).to(torch.int32), 2)
            for i in range(0, rows + pad, INT4_CPU_PACK_ROWS)])
    return packed, scales_and_zeros.transpose(0, 1).contiguous()  # (groups, rows, 2)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x times the normalized n x n Hadamard matrix (Sylvester's order, n a power of two) over
    its last dimension, computed in float32: SpinQuant's online rotation of w2's input, as a fast
    Walsh-Hadamard transform (n log n additions instead of an n x n product)."""
    n = x.shape[-1]
    y = x.float().reshape(-1, n)
    half = 1
    while half < n:
        pairs = y.view(y.shape[0], n // (2 * half), 2, half)
        y = torch.cat((pairs[:, :, :1] + pairs[:, :, 1:], pairs[:, :, :1] - pairs[:, :, 1:]), dim=2)
        half *= 2
    return (y.view(x.shape) / math.sqrt(n)).to(x.dtype)


def fp8_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether FP8 weights run as FP8 matrix products here: a CUDA GPU of compute capability 8.9
    or more, and bfloat16 activations (what _scaled_mm's row-wise scaling outputs)."""
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scales).T for an FP8 weight (out, in) and float32 row scales (out,), with
    x quantized to FP8 per token as Meta's reference does: each row scaled so that its largest
    magnitude (at most FP8_ACTIVATION_BOUND) becomes 448."""
    rows = x.reshape(-1, x.shape[-1])
    amax = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12, max=FP8_ACTIVATION_BOUND)
    x_scales = amax / FP8_MAX
    xq = (rows.float() / x_scales).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scales, scale_b=scales[None, :], out_dtype=x.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


def _uses_cpu_linear(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and cpu_linear.has_quantized_kernels()


def _inner_k_tiles(cols: int) -> int:
    """The CUDA int4 packing's tile count along the input: the largest that divides it."""
    return next(t for t in (8, 4, 2) if cols % (16 * t) == 0)


def linear(x: torch.Tensor, scheme: Scheme, out_features: int, weight: torch.Tensor,
           scales: torch.Tensor) -> torch.Tensor:
    """x @ dequantized(weight).T from kernel operands (kernel_operands' layout)."""
    if scheme.name == "fp8":
        if scales is not None:
            return fp8_linear(x, weight, scales)
        return cpu_linear.linear(x, weight) if x.device.type == "cpu" else F.linear(x, weight)
    if _uses_cpu_linear(weight):
        return cpu_linear.quantized_linear(x, weight, scales, scheme.group_size or 0)
    rows = x.reshape(-1, x.shape[-1])
    if scheme.name == "int8":
        if x.device.type == "cuda":  # compiled, the conversion fuses into the product
            y = F.linear(rows, weight.to(x.dtype)) * scales
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows, weight, scales)
    elif x.device.type == "cuda":
        y = torch.ops.aten._weight_int4pack_mm(rows, weight, scheme.group_size, scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight, scheme.group_size, scales)[:, :out_features]
    return y.view(*x.shape[:-1], out_features)


def check_dtype(scheme: Scheme | None, dtype: torch.dtype, device: torch.device) -> None:
    """torch's CUDA int4 kernel takes bfloat16 activations only."""
    if scheme and scheme.name == "int4" and device.type == "cuda" and dtype != torch.bfloat16:
        raise UserError(f"--dtype {str(dtype).removeprefix('torch.')}: torch's CUDA int4 kernel takes bfloat16 "
                        "only; use --dtype bfloat16 with this int4 checkpoint")


# ---------------------------------------------------------------------------------------
# Quantized linear modules (set up by llama.parallel's quantized styles)


def local_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward of a quantized linear module: this rank's shard times x, as plain tensors."""
    if not module.packed:
        raise RuntimeError("quantized weights used before quantize.pack_for_device(model)")
    y = linear(x, module.scheme, module.local_out_features, module.weight, module.scales)
    if getattr(module, "adaptor_a", None) is not None:  # LoRA, in the activations' dtype
        y = y + F.linear(F.linear(x, module.adaptor_a), module.adaptor_b)
    return y


# Column-parallel projections that read the same input, fused at load into one product (name:
# its parts): one kernel call instead of three or two, over more rows. Measured on llama3.2-1b
# (AVX2 EPYC, 2 threads, fused and separate models alternating in one process): compiled decode
# steps 9% faster in int4, 7% in int8; eager 1% (splitting the output costs about what it saves).
FUSED = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}


def _packed(scheme: Scheme, parts: list[nn.Module]) -> tuple[nn.Parameter, nn.Parameter]:
    """The kernel's (weight, scales) for the local shards of quantized modules, their rows one
    after the other (one module: its own, uncopied)."""
    def joined(name: str) -> torch.Tensor:
        tensors = [_local(getattr(part, name)) for part in parts]
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

    zeros = joined("zeros") if scheme.name == "int4" else None
    weight, scales = kernel_operands(scheme, joined("weight"), joined("scales"), zeros, parts[0].compute_dtype)
    # fp8 dequantized at load has no scales left.
    return nn.Parameter(weight, requires_grad=False), scales if scales is None else nn.Parameter(scales, requires_grad=False)


class FusedLinear(nn.Module):
    """Quantized projections' local shards as one: their rows one after the other, in the
    kernel's layout, so the output is theirs side by side (no collective: column-parallel)."""

    def __init__(self, scheme: Scheme, parts: list[nn.Module]) -> None:
        super().__init__()
        self.scheme, self.packed = scheme, True
        self.local_out_features = sum(part.local_out_features for part in parts)
        self.weight, self.scales = _packed(scheme, parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_linear(self, x)


def pack_for_device(model: nn.Module) -> None:
    """After the stored shards are loaded: replace each quantized module's DTensors by its
    kernel's operands (plain tensors), fusing the projections of FUSED. The model then serves
    inference only; reload from DCP to change the TP degree."""
    for module in list(model.modules()):
        for fused, names in FUSED.items():
            parts = [getattr(module, name, None) for name in names]
            if all(getattr(part, "scheme", None) and not part.packed and not part.scheme.lora_rank for part in parts):
                setattr(module, fused, FusedLinear(parts[0].scheme, parts))
                for name, part in zip(names, parts):
                    delattr(module, name)
                    # Its tensors go now: the module itself waits for the cycle collector (its
                    # forward refers to it), and would hold them all until then.
                    for tensor, _ in list(part.named_parameters(recurse=False)):
                        delattr(part, tensor)
    for module in model.modules():
        if getattr(module, "scheme", None) is None or module.packed:
            continue
        module.weight, module.scales = _packed(module.scheme, [module])
        if module.scheme.name == "int4":
            del module.zeros
        if module.scheme.lora_rank:
            module.adaptor_a, module.adaptor_b = (nn.Parameter(_local(t), requires_grad=False)
                                                  for t in (module.adaptor_a, module.adaptor_b))
        module.packed = True


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
