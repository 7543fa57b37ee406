"""Run under torchrun (2 ranks) with one argument:
- mismatch: the ranks call all-reduces of different sizes (then all-gathers of different row
  widths), as a bug would; prints the error each rank gets, one line each.
- no_room: rank 0 may not write a file as large as the segment (RLIMIT_FSIZE, as a small
  /dev/shm would refuse it); prints the collective path, then checks an all-reduce through it."""

import os
import resource
import signal
import sys

import torch

from llama.distributed import init_runtime, log, run_cli
from llama.shm_collectives import CollectiveMismatchError, for_mesh


def main() -> None:
    mode = sys.argv[1]
    if mode == "no_room" and os.environ["RANK"] == "0":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    runtime = init_runtime()
    collectives = for_mesh(runtime.mesh)
    log(f"path: {collectives.path}")
    if mode == "no_room":
        assert torch.equal(collectives.all_reduce(torch.ones(8)), torch.full((8,), 2.0))
        log(f"segments left: {sorted(p.name for p in os.scandir('/dev/shm') if str(os.getpid()) in p.name)}")
        return
    for call in (lambda: collectives.all_reduce(torch.ones(4 if runtime.rank == 0 else 1000)),
                 lambda: collectives.all_gather(torch.ones(2, 3 if runtime.rank == 0 else 6))):
        try:
            call()
            said = "no error"
        except CollectiveMismatchError as e:
            said = str(e)
        os.write(1, f"rank {runtime.rank}: {said}\n".encode())  # one write: the ranks share stdout


if __name__ == "__main__":
    run_cli(main)
