"""Writing checkpoints in Meta's fairscale layout: what the demo and the tests feed to the converter.

Meta saves model-parallel rank r's slice of every weight in consolidated.0r.pth: column-
parallel weights split by rows, row-parallel ones by columns, norms whole in every file,
the embedding split by columns (Llama 2's ParallelEmbedding) or by rows (Llama 3's
VocabParallelEmbedding).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llama.args import ModelArgs

ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


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
