"""Run under torchrun: the shared-memory all-reduce and all-gather against gloo's on random
tensors, bit for bit, eager and inside a compiled function. Prints the collective path and
one line per mismatch; exits 1 if there is any."""

import sys

import torch
import torch.distributed as dist

from llama.distributed import init_runtime, log, run_cli
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
    for line in mismatches:
        print(line, file=sys.stderr)
    dist.barrier()
    if mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    run_cli(main)
