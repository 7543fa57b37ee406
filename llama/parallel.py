"""The tensor-parallel plan: the one place that knows how the model is sharded.

Megatron-style: in each block wq/wk/wv and w1/w3 are split by output features (heads and
hidden units stay whole on a rank), wo and w2 by input features, so a block costs two
all-reduces. The embedding is split over the vocabulary (an all-reduce) and the output
projection over the vocabulary too (an all-gather of the logits).
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from llama.args import ModelArgs
from llama.errors import UserError
from llama.model import Transformer

BLOCK_PLAN = {
    "attention.wq": ColwiseParallel(),
    "attention.wk": ColwiseParallel(),
    "attention.wv": ColwiseParallel(),
    "attention.wo": RowwiseParallel(),
    "feed_forward.w1": ColwiseParallel(),
    "feed_forward.w3": ColwiseParallel(),
    "feed_forward.w2": RowwiseParallel(),
}


def check_tp_degree(args: ModelArgs, tp: int) -> None:
    """Fail early, with the numbers, if the model cannot be split `tp` ways."""
    problems = [
        f"{name} {value}"
        for name, value in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads),
                            ("FFN hidden size", args.ffn_hidden_dim))
        if value % tp
    ]
    if problems:
        raise UserError(
            f"tensor-parallel degree {tp} (--nproc_per_node x --nnodes) does not divide {', '.join(problems)}; "
            f"use a degree that divides n_kv_heads={args.n_kv_heads}"
        )


def parallelize(model: Transformer, mesh: DeviceMesh) -> Transformer:
    """Shard `model` (on any device, typically meta) over the 1-D `mesh` in place."""
    tp = mesh.size()
    check_tp_degree(model.args, tp)
    parallelize_module(model, mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Replicate()),
    })
    for block in model.layers:
        parallelize_module(block, mesh, BLOCK_PLAN)
        block.attention.n_heads //= tp
        block.attention.n_kv_heads //= tp
    return model
