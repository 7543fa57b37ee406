"""Process-group setup, rank-0 logging and the error handling shared by the scripts.

One code path for every target: CUDA + NCCL when GPUs are visible (one per local rank),
otherwise CPU + gloo. Scripts run under torchrun or as a plain single process.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llama.errors import UserError

# How long a rank other than 0 waits, after failing, for rank 0 to report the same error.
OTHER_RANKS_ERROR_GRACE_S = 10.0


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def log(*parts: object, **print_kwargs: object) -> None:
    """Print on rank 0 only; every rank calls it so nothing is said twice."""
    if _rank() == 0:
        print(*parts, **print_kwargs, flush=True)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def max_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """Element by element, the largest of every rank's `values`, in one collective that
    every rank must join (`device` must suit the backend: a GPU for NCCL)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def init_runtime(use_gpus: bool = True) -> Runtime:
    """Join (or form, when run without torchrun) the process group and build a 1-D mesh.

    use_gpus=False keeps a job on the CPU with gloo even where GPUs are visible (checkpoint
    conversion only moves bytes from disk to disk)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_gpus and torch.cuda.is_available():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_world > torch.cuda.device_count():
            raise UserError(
                f"--nproc_per_node {local_world} exceeds the {torch.cuda.device_count()} visible GPU(s); "
                f"use at most {torch.cuda.device_count()} processes per node"
            )
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("tp",))
    return Runtime(rank=dist.get_rank(), world_size=world_size, device=device, mesh=mesh)


def _say_error_once(error: UserError) -> None:
    """Print `error` once for the whole job. Every rank validates the same inputs, so all
    usually fail together: rank 0 says it, and its exit makes torchrun end the others. A
    rank that fails first must not exit before rank 0 has spoken (torchrun would kill rank 0
    mid-way), so it waits; if it is still alive after that, the error was its own to say."""
    rank = _rank()
    if rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return
    time.sleep(OTHER_RANKS_ERROR_GRACE_S)
    print(f"error (rank {rank}): {error}", file=sys.stderr, flush=True)


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main: bad input becomes one line on stderr and exit status 1 on every
    rank; Ctrl-C exits quietly with 130."""
    code = 0
    try:
        main()
    except UserError as e:
        _say_error_once(e)
        code = 1
    except KeyboardInterrupt:
        code = 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Leave without interpreter teardown: with gloo and a DeviceMesh, torch 2.13 sometimes
    # aborts in its exit-time destructors ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
