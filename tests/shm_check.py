"""Run under torchrun: the shared-memory all-reduce and all-gather against gloo's on random
tensors, bit for bit, eager and inside a compiled function; and the TP plan's layers around
them (vocabulary-parallel embedding, gathered logits) with a vocabulary the ranks do not
divide evenly. Prints the collective path and one line per mismatch; exits 1 if any."""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import parallelize_module

from llama.distributed import init_runtime, log, run_cli
from llama.parallel import GatheredColwiseParallel, VocabParallelEmbedding
from llama.shm_collectives import for_mesh

SHAPES = [(1,), (7, 5), (2048,), (3, 1000, 33),
          # 8.4 MB of float32: several 1 MiB rounds, and gloo cuts it into segments of 1 MiB,
          # which moves the boundaries of its ranks' chunks (so the order of summation).
          (2_100_001,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def main() -> None:
    runtime = init_runtime()
    collectives = for_mesh(runtime.mesh)
    log(f"path: {collectives.path}")
    compiled_reduce = torch.compile(collectives.all_reduce, fullgraph=True)
    compiled_gather = torch.compile(collectives.all_gather, fullgraph=True)
    g = torch.Generator().manual_seed(runtime.rank)
    mismatches = []
    for dtype in DTYPES:
        for shape in SHAPES:
            if dtype != torch.float32 and len(shape) == 1 and shape[0] > 10**6:
                continue  # the large case is about gloo's segments, the same for every type
            # Magnitudes spread over 6 decades: the order of summation shows in the last bits.
            x = (torch.randn(shape, generator=g) * 10.0 ** torch.randint(-3, 3, shape, generator=g)).to(dtype)
            expected = x.clone()
            dist.all_reduce(expected)
            pieces = [torch.empty_like(x) for _ in range(runtime.world_size)]
            dist.all_gather(pieces, x)
            gathered = torch.cat(pieces, dim=-1)
            results = {"all-reduce": (collectives.all_reduce(x), expected),
                       "all-gather": (collectives.all_gather(x), gathered)}
            if shape == (7, 5):
                results["compiled all-reduce"] = (compiled_reduce(x), expected)
                results["compiled all-gather"] = (compiled_gather(x), gathered)
            for name, (got, want) in results.items():
                if got.shape != want.shape or not torch.equal(bits(got), bits(want)):
                    mismatches.append(f"rank {runtime.rank}: {name} of {dtype} {shape} differs from gloo's")
    mismatches += uneven_vocabulary(runtime)
    for line in mismatches:
        print(line, file=sys.stderr)
    dist.barrier()
    if mismatches:
        raise SystemExit(1)


def uneven_vocabulary(runtime) -> list[str]:
    """4 x ranks - 1 rows: torch.chunk gives the last rank one row fewer."""
    vocab, dim = 4 * runtime.world_size - 1, 8
    g = torch.Generator().manual_seed(0)  # the same full weights on every rank
    table, projection, x = torch.randn(vocab, dim, generator=g), torch.randn(vocab, dim, generator=g), torch.randn(
        3, dim, generator=g)
    embedding, output = nn.Embedding(vocab, dim), nn.Linear(dim, vocab, bias=False)
    embedding.weight.data.copy_(table)
    output.weight.data.copy_(projection)
    parallelize_module(embedding, runtime.mesh, VocabParallelEmbedding())
    parallelize_module(output, runtime.mesh, GatheredColwiseParallel())
    tokens = torch.arange(vocab).flip(0)[None]
    problems = []
    if not torch.equal(embedding(tokens), table[tokens]):
        problems.append(f"rank {runtime.rank}: the vocabulary-parallel embedding differs from a lookup")
    logits = output(x)
    if logits.shape != (3, vocab) or not torch.allclose(logits, F.linear(x, projection), rtol=1e-5, atol=1e-6):
        problems.append(f"rank {runtime.rank}: the gathered logits differ from the full product")
    return problems


if __name__ == "__main__":
    run_cli(main)
