"""One rank of a job launched without torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT set by
the test), and without llama.distributed's watch, so only the shared-memory collective's own
liveness check can notice a lost peer: rank 0 waits in an all-reduce that rank 1 never joins;
the test kills rank 1."""

import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from llama.shm_collectives import PeerLostError, for_mesh


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    collectives = for_mesh(mesh)
    print(f"ready: {collectives.path}", flush=True)
    if dist.get_rank() == 0:
        try:
            collectives.all_reduce(torch.ones(1024, dtype=torch.bfloat16))
        except PeerLostError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            os._exit(1)
    time.sleep(3600)


if __name__ == "__main__":
    main()
