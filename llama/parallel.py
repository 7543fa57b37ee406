"""The tensor-parallel plan: the one place that knows how the model is sharded.

Megatron-style: in each block wq/wk/wv and w1/w3 are split by output features (heads and
hidden units stay whole on a rank), wo and w2 by input features, so a block costs two
all-reduces. The embedding is split over the vocabulary (an all-reduce) and the output
projection over the vocabulary too (an all-gather of the logits). The collectives go through
llama.shm_collectives: shared memory between the CPU ranks of one host, torch.distributed
otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from llama import cpu_linear, quantize
from llama.args import ModelArgs
from llama.errors import UserError
from llama.model import Transformer
from llama.shm_collectives import Collectives, for_mesh


def _alias_local_shard(module: nn.Module) -> None:
    """The module's local shard as a plain tensor, `local_weight` (a non-persistent buffer sharing
    the DTensor's storage), which the forwards below read: a DTensor weight costs a compiled step
    host time to unwrap. Made again by share_local_shards once a meta-built model is materialized."""
    module.register_buffer("local_weight", module.weight.to_local(), persistent=False)


def _local_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x times the local shard; llama.cpu_linear chooses the kernel by what the CPU has."""
    return cpu_linear.linear(x, module.local_weight)


def _all_reduced(local_forward: Callable[[torch.Tensor], torch.Tensor], collectives: Collectives,
                 x: torch.Tensor) -> torch.Tensor:
    """A row-parallel layer's output: the partial products of the ranks summed (the one
    all-reduce of every row-parallel style, quantized or not)."""
    return collectives.all_reduce(local_forward(x))


def _all_gathered(local_forward: Callable[[torch.Tensor], torch.Tensor], collectives: Collectives,
                  out_features: int, x: torch.Tensor) -> torch.Tensor:
    """A column-parallel layer's whole output (the logits): the ranks' slices concatenated in
    rank order. DTensor splits like torch.chunk, so when the ranks do not divide out_features
    evenly the last slices are shorter: they are padded to the first one's width, and the
    padding is cut after the gather."""
    local = local_forward(x)
    width = -(-out_features // collectives.size)
    if local.shape[-1] < width:
        local = F.pad(local, (0, width - local.shape[-1]))
    gathered = collectives.all_gather(local)
    return gathered if gathered.shape[-1] == out_features else gathered[..., :out_features]


class LocalColwiseParallel(ColwiseParallel):
    """ColwiseParallel's sharding (a Shard(0) DTensor weight, so DCP loads it at any degree),
    with a forward that multiplies the replicated input by the local shard as plain tensors.
    In eager mode DTensor's per-op dispatch costs about half a millisecond per linear layer
    on CPU (measured), as much as a small model's matrix-vector products in a decode step."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        distribute_module(module, device_mesh, self._partition_linear_fn)
        _alias_local_shard(module)
        module.forward = functools.partial(_local_linear, module)
        return module


class LocalRowwiseParallel(RowwiseParallel):
    """RowwiseParallel's sharding (Shard(1) weight); the forward multiplies the sharded input
    by the local shard and sums the partial outputs with one all-reduce, as plain tensors.
    A one-rank mesh skips the all-reduce: through gloo it cost 9% of a decode step (measured)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        distribute_module(module, device_mesh, self._partition_linear_fn)
        _alias_local_shard(module)
        if device_mesh.size() == 1:
            module.forward = functools.partial(_local_linear, module)
        else:
            module.forward = functools.partial(_all_reduced, functools.partial(_local_linear, module),
                                               for_mesh(device_mesh))
        return module


def _vocab_parallel_embedding(module: nn.Embedding, collectives: Collectives, tokens: torch.Tensor) -> torch.Tensor:
    """Each rank looks up the tokens of its slice of the vocabulary (rows start at rank x
    ceil(vocab / ranks), torch.chunk's split), zeros for the others; the sum over ranks holds
    every token's row exactly (x + 0 = x), whatever the order."""
    weight = module.local_weight
    local = tokens - collectives.rank * -(-module.num_embeddings // collectives.size)
    outside = (local < 0) | (local >= weight.shape[0])
    rows = F.embedding(local.masked_fill(outside, 0), weight)
    return collectives.all_reduce(rows.masked_fill(outside[..., None], 0))


class VocabParallelEmbedding(RowwiseParallel):
    """The embedding split over the vocabulary (RowwiseParallel's Shard(0) DTensor weight),
    looked up in the local shard as plain tensors, with one all-reduce (DTensor's dispatch
    would cost about as much as the lookup itself in an eager decode step)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        distribute_module(module, device_mesh, self._partition_embedding_fn)
        _alias_local_shard(module)
        if device_mesh.size() == 1:
            module.forward = lambda tokens: F.embedding(tokens, module.local_weight)
        else:
            module.forward = functools.partial(_vocab_parallel_embedding, module, for_mesh(device_mesh))
        return module


class GatheredColwiseParallel(ColwiseParallel):
    """The output projection: ColwiseParallel's sharding over the vocabulary; the forward
    multiplies by the local shard and all-gathers the logits, as plain tensors."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        distribute_module(module, device_mesh, self._partition_linear_fn)
        _alias_local_shard(module)
        module.forward = functools.partial(_all_gathered, functools.partial(_local_linear, module),
                                           for_mesh(device_mesh), module.out_features)
        return module


BLOCK_PLAN = {
    "attention.wq": LocalColwiseParallel(),
    "attention.wk": LocalColwiseParallel(),
    "attention.wv": LocalColwiseParallel(),
    "attention.wo": LocalRowwiseParallel(),
    "feed_forward.w1": LocalColwiseParallel(),
    "feed_forward.w3": LocalColwiseParallel(),
    "feed_forward.w2": LocalRowwiseParallel(),
}


class KVHeadParallel(ParallelStyle):
    """wk/wv when the TP degree exceeds the KV heads (Llama 3.1 405B, 8 KV heads, on 16 GPUs):
    each KV head stays whole and is held by the tp // n_kv_heads consecutive ranks whose query
    heads attend to it. The weight is a DTensor laid out Shard(0) x Replicate on a
    (n_kv_heads, replicas) view of the mesh, so DCP still loads it from any checkpoint."""

    def __init__(self, kv_mesh: DeviceMesh) -> None:
        super().__init__()
        self.kv_mesh = kv_mesh

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.weight = nn.Parameter(distribute_tensor(module.weight, self.kv_mesh, [Shard(0), Replicate()]))
        _alias_local_shard(module)
        module.forward = functools.partial(_local_linear, module)
        return module


class QuantizedParallel(ParallelStyle):
    """A linear layer with int8/int4/fp8 weights (llama.quantize), split like the
    styles above: its stored tensors (values, scales, zeros) are DTensors, so DCP loads them
    at any degree, split along the output rows (column-parallel, and the replicated KV heads'
    2-D layout) or along the input (row-parallel, where an int8 per-row scale is replicated:
    it covers the whole row; so is fp8's). After quantize.pack_for_device the forward runs the quantized
    kernel on the local shards, then the row-parallel all-reduce or the logits' all-gather."""

    def __init__(self, scheme: quantize.Scheme, split_inputs: bool = False, gather_output: bool = False,
                 kv_mesh: DeviceMesh | None = None, rotate_input: bool = False) -> None:
        super().__init__()
        self.scheme, self.split_inputs, self.gather_output, self.kv_mesh = scheme, split_inputs, gather_output, kv_mesh
        self.rotate_input = rotate_input

    def _placements(self, name: str, shape: tuple[int, ...]) -> list[Shard | Replicate]:
        # A LoRA adaptor's A (rank, in) follows the input and B (out, rank) the output: so a
        # row-parallel rank adds B (A_r x_r), which the all-reduce sums to B (A x).
        if self.kv_mesh is not None:
            return [Replicate(), Replicate()] if name == "adaptor_a" else [Shard(0), Replicate()]
        if not self.split_inputs:
            return [Replicate()] if name == "adaptor_a" else [Shard(0)]
        return [Replicate()] if len(shape) == 1 or name == "adaptor_b" else [Shard(1)]

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        rows, cols = module.weight.shape
        float_dtype = module.weight.dtype
        mesh = self.kv_mesh or device_mesh
        for name, (shape, dtype) in quantize.layer_tensors(self.scheme, rows, cols).items():
            stored = torch.empty(shape, dtype=dtype or float_dtype, device=module.weight.device)
            setattr(module, name, nn.Parameter(distribute_tensor(stored, mesh, self._placements(name, shape)),
                                               requires_grad=False))
        module.scheme, module.packed, module.compute_dtype = self.scheme, False, float_dtype
        module.local_out_features = module.weight.to_local().shape[0]
        local_forward = functools.partial(quantize.local_linear, module)
        if self.rotate_input:
            local_forward = functools.partial(_rotated_input, local_forward,
                                              for_mesh(device_mesh) if device_mesh.size() > 1 else None)
        if self.gather_output and device_mesh.size() > 1:
            module.forward = functools.partial(_all_gathered, local_forward, for_mesh(device_mesh), rows)
        elif self.split_inputs and device_mesh.size() > 1:
            module.forward = functools.partial(_all_reduced, local_forward, for_mesh(device_mesh))
        else:
            module.forward = local_forward
        return module


def _rotated_input(local_forward: Callable[[torch.Tensor], torch.Tensor], collectives: Collectives | None,
                   x: torch.Tensor) -> torch.Tensor:
    """SpinQuant's w2: the product of this rank's columns with its part of hadamard(whole input).
    The rotation mixes every input, so the ranks' parts are gathered first (a hidden-size row
    a token, small beside the all-reduce of the output that follows)."""
    if collectives is None:
        return local_forward(quantize.hadamard(x))
    width = x.shape[-1]
    whole = quantize.hadamard(collectives.all_gather(x))
    return local_forward(whole[..., collectives.rank * width:(collectives.rank + 1) * width])


def quantized_block_plan(scheme: quantize.Scheme) -> dict[str, ParallelStyle]:
    """BLOCK_PLAN with every linear layer quantized, split the same way."""
    return {name: QuantizedParallel(scheme, split_inputs=isinstance(style, LocalRowwiseParallel),
                                    rotate_input=scheme.spinquant and name == "feed_forward.w2")
            for name, style in BLOCK_PLAN.items()}


def local_kv_heads(n_kv_heads: int, tp: int) -> int:
    """KV heads each rank holds: a share of them, or one replicated head when tp > n_kv_heads."""
    return max(1, n_kv_heads // tp)


def check_tp_degree(args: ModelArgs, tp: int) -> None:
    """Fail early, with the numbers, if the model cannot be split `tp` ways."""
    problems = [f"{name} {value}" for name, value in (("n_heads", args.n_heads), ("FFN hidden size", args.ffn_hidden_dim))
                if value % tp]
    if args.n_kv_heads % tp and tp % args.n_kv_heads:
        problems.append(f"n_kv_heads {args.n_kv_heads} (nor is it a multiple of it)")
    if problems:
        raise UserError(
            f"tensor-parallel degree {tp} (--nproc_per_node x --nnodes) does not divide {', '.join(problems)}; "
            f"use a divisor or a multiple of n_kv_heads={args.n_kv_heads} that divides n_heads={args.n_heads}"
        )


def parallelize(model: Transformer, mesh: DeviceMesh) -> Transformer:
    """Shard `model` (on any device, typically meta) over the 1-D `mesh` in place."""
    tp = mesh.size()
    n_kv_heads = model.args.n_kv_heads
    check_tp_degree(model.args, tp)
    scheme = quantize.scheme_of(model.args)
    quantize.check_tp_degree(model.args, tp)
    n_layers = model.args.n_layers
    parallelize_module(model, mesh, {
        "tok_embeddings": VocabParallelEmbedding(),
        "output": (QuantizedParallel(scheme, gather_output=True) if quantize.quantizes(scheme, "output.weight", n_layers)
                   else GatheredColwiseParallel()),
    })
    plans = [dict(BLOCK_PLAN), quantized_block_plan(scheme) if scheme else {}]
    if tp > n_kv_heads:
        kv_mesh = DeviceMesh(mesh.device_type, mesh.mesh.view(n_kv_heads, tp // n_kv_heads),
                             mesh_dim_names=("kv_head", "replica"))
        plans[0]["attention.wk"] = plans[0]["attention.wv"] = KVHeadParallel(kv_mesh)
        if scheme:
            plans[1]["attention.wk"] = plans[1]["attention.wv"] = QuantizedParallel(scheme, kv_mesh=kv_mesh)
    for i, block in enumerate(model.layers):
        # Each linear quantized or not as the scheme says (fp8: only the inner layers' feed-forward).
        parallelize_module(block, mesh, {name: plans[quantize.quantizes(scheme, f"layers.{i}.{name}.weight", n_layers)][name]
                                         for name in BLOCK_PLAN})
        block.attention.n_heads //= tp
        block.attention.n_kv_heads = local_kv_heads(n_kv_heads, tp)
    return model


class FusedLocalLinear(nn.Module):
    """Column-parallel projections that read the same input (quantize.FUSED) as one product:
    their local shards are rows of one plain tensor, so one kernel reads them all, and their
    own DTensor weights become views of those rows (state_dict, DCP and gathering see them
    as before, and loading writes through them into this tensor)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        shards = [part.weight.to_local() for part in parts]
        fused = shards[0].new_empty(sum(s.shape[0] for s in shards), shards[0].shape[1])
        self.register_buffer("local_weight", fused, persistent=False)
        for part, rows in zip(parts, fused.split([s.shape[0] for s in shards])):
            dtensor = part.weight
            part.weight = nn.Parameter(DTensor.from_local(rows, dtensor.device_mesh, dtensor.placements, run_check=False,
                                                          shape=dtensor.shape, stride=dtensor.stride()),
                                       requires_grad=False)
            part.register_buffer("local_weight", rows, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _local_linear(self, x)


def share_local_shards(model: Transformer) -> None:
    """After materialization, before loading: every unquantized layer's local_weight aliases its
    shard again (to_empty gave buffers and parameters storage of their own), and wq/wk/wv and
    w1/w3 are fused into one product each (wqkv, w13). A compiled step then takes plain tensors as
    inputs, not DTensors, whose unwrapping cost its host 1.9 ms a call, and makes 3 products a
    layer instead of 7 (llama2-7b bf16 on an H200, with coordinate descent tuning: 7.2 -> 5.2 ms a
    step). Quantized layers are laid out after loading (quantize.pack_for_device)."""
    for module in model.modules():
        if isinstance(getattr(module, "weight", None), DTensor) and hasattr(module, "local_weight"):
            _alias_local_shard(module)
    for module in list(model.modules()):
        for fused, names in quantize.FUSED.items():
            parts = [getattr(module, name, None) for name in names]
            if all(isinstance(part, nn.Linear) and hasattr(part, "local_weight") for part in parts):
                setattr(module, fused, FusedLocalLinear(parts))


def build_sharded(args: ModelArgs, mesh: DeviceMesh, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A model whose weights are allocated, uninitialized, only for this rank's shards: built on
    the meta device, parallelized, then materialized on `device`."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    parallelize(model, mesh)
    model.to_empty(device=device)
    share_local_shards(model)
    return model
