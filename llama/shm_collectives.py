"""The tensor-parallel plan's collectives: through shared memory when every rank runs on one
host's CPUs, through torch.distributed (gloo, NCCL) otherwise.

Why: a decode step makes two all-reduces per block plus the embedding's and the logits'
all-gather, each a few KB. Between two local processes gloo takes 0.7-1.5 ms for one (it goes
through sockets), which made TP=2 decode at 0.56-0.66x TP=1 on a CPU; a shared-memory
exchange takes microseconds (DeepSpeed's shm_comm and vLLM's CPU backend do the same).

How: rank 0 creates a segment in /dev/shm holding one flag and two slots per rank; the
others map it. A collective copies each rank's piece into its slot, publishes a round
number (release store) and waits for every rank's (acquire loads), then each rank reads all
slots: no locks, one synchronization per round (shm_collectives.c). With each round a rank
also publishes its call (operation, bytes, dtype or row width), and every rank checks its
peers' against its own before reading their slots: ranks that disagree (a bug) fail with one
line (CollectiveMismatchError) instead of mixing each other's data. The sums follow gloo's
ring order element by element, so they equal gloo's bit for bit and are identical on every
rank (all ranks sample from the same logits). A rank that waits checks every 20 ms that the
ranks it waits for are still alive and gives up after the process group's timeout, so a
killed peer ends the others at once instead of leaving them spinning.

The C part is built once per machine by llama.native (about a second; no torch headers) and
loaded with ctypes. It is used only when the job has one launcher (LOCAL_WORLD_SIZE equals
WORLD_SIZE; torchrun --nnodes N keeps torch.distributed even for ranks that share a host),
rank 0 can reserve the segment's memory (posix_fallocate: a container's small /dev/shm means
gloo, not a SIGBUS at the first write), every rank can map the segment rank 0 created
(checked with a random nonce, so it never
engages across hosts), the ranks see each other's processes, and a C compiler exists;
otherwise, and for GPU tensors, torch.distributed does the work. TP_LLAMA_SHM=0 turns it
off. Inside a compiled decode step it runs as operators (tp_llama::shm_all_reduce /
shm_all_gather) with fake implementations.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import secrets
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

from llama import native

_SOURCE = Path(__file__).with_name("shm_collectives.c")
_SHM_DIR = Path("/dev/shm")

# Bytes each rank exchanges per round; larger tensors take several rounds. 2 x ranks x this
# is the segment's size.
SLOT_BYTES = 1 << 20
# gloo's ring all-reduce cuts its input into segments of at most this many bytes (its
# default, as torch uses it; tests/test_shm_collectives.py checks against gloo), which
# decides where each rank's chunk, and so each element's order of summation, begins.
GLOO_MAX_SEGMENT_BYTES = 1 << 20
_MAX_RANKS = 256  # the C side's fixed-size arrays
# Element types the C side reduces, by its codes.
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_PEER_DIED, _PEER_LATE, _PEER_DIFFERS = 1000, 2000, 3000
_DTYPE_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in _DTYPE_CODES.items()}


class PeerLostError(RuntimeError):
    """A rank died, or never arrived, while the others waited for it in a collective."""


class CollectiveMismatchError(RuntimeError):
    """Ranks called different collectives (operation, size or dtype) in the same round: a bug,
    caught before any rank used another's data."""


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native.build(_SOURCE)
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.shm_segment_bytes.argtypes, lib.shm_segment_bytes.restype = [ctypes.c_int, i64], i64
    lib.shm_set_identity.argtypes, lib.shm_set_identity.restype = [ptr, ctypes.c_int, i64, ctypes.c_uint64], None
    lib.shm_nonce.argtypes, lib.shm_nonce.restype = [ptr], ctypes.c_uint64
    lib.shm_peer_alive.argtypes, lib.shm_peer_alive.restype = [ptr, ctypes.c_int], ctypes.c_int
    lib.shm_all_reduce.argtypes = [ptr, ctypes.c_int, ctypes.c_int, i64, ptr, ptr, i64, ctypes.c_int, i64,
                                   ctypes.c_double]
    lib.shm_all_gather.argtypes = [ptr, ctypes.c_int, ctypes.c_int, i64, ptr, ptr, i64, i64, ctypes.c_double]
    lib.shm_peer_call.argtypes, lib.shm_peer_call.restype = [ptr, ctypes.c_int, i64, ptr], None
    lib.shm_round.argtypes, lib.shm_round.restype = [ptr, ctypes.c_int], i64
    return lib


class _Segment:
    """This rank's mapping of the group's shared-memory segment."""

    def __init__(self, lib: ctypes.CDLL, memory: mmap.mmap, rank: int, size: int, timeout_s: float) -> None:
        self.lib, self.memory, self.rank, self.size, self.timeout_s = lib, memory, rank, size, timeout_s
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(memory))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        status = self.lib.shm_all_reduce(self.base, self.rank, self.size, SLOT_BYTES, x.data_ptr(), out.data_ptr(),
                                         x.numel(), _DTYPE_CODES[x.dtype], GLOO_MAX_SEGMENT_BYTES, self.timeout_s)
        if status:
            raise self._lost(status, "all-reduce")
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x concatenated along the last dimension."""
        x = x.contiguous()
        out = x.new_empty((*x.shape[:-1], self.size * x.shape[-1]))
        row_bytes = x.shape[-1] * x.element_size()
        status = self.lib.shm_all_gather(self.base, self.rank, self.size, SLOT_BYTES, x.data_ptr(), out.data_ptr(),
                                         x.numel() // max(1, x.shape[-1]), row_bytes, self.timeout_s)
        if status:
            raise self._lost(status, "all-gather")
        return out

    def _lost(self, status: int, what: str) -> RuntimeError:
        if status >= _PEER_DIFFERS:
            peer = status - _PEER_DIFFERS
            round_ = self.lib.shm_round(self.base, self.rank)
            calls = []
            for rank in (self.rank, peer):
                call = (ctypes.c_int64 * 4)()
                self.lib.shm_peer_call(self.base, rank, round_, call)
                calls.append(self._describe(*call))
            return CollectiveMismatchError(f"shared-memory collectives out of step: rank {self.rank} called "
                                           f"{calls[0]} while rank {peer} called {calls[1]}")
        if status >= _PEER_LATE:
            return PeerLostError(f"rank {status - _PEER_LATE} did not join a shared-memory {what} within "
                                 f"{self.timeout_s:.0f} s (the process group's timeout)")
        return PeerLostError(f"rank {status - _PEER_DIED} exited during a shared-memory {what}")

    @staticmethod
    def _describe(op: int, dtype: int, nbytes: int, row_bytes: int) -> str:
        if op == 1:
            return f"an all-reduce of {nbytes} bytes of {_DTYPE_NAMES.get(dtype, dtype)}"
        return f"an all-gather of {nbytes} bytes in rows of {row_bytes}" if op == 2 else "nothing"


def _open_segment(group: dist.ProcessGroup) -> tuple[_Segment | None, str]:
    """Map one segment on every rank of `group` (collective), or say why not."""
    rank, size = group.rank(), group.size()
    lib = _library()
    reasons: list[str] = [""] * size
    dist.all_gather_object(reasons, _local_obstacle(lib, size), group=group)
    if any(reasons):
        return None, next(r for r in reasons if r)
    timeout_s = _timeout_s(group)
    segment, offer, path = None, [None], None
    try:
        if rank == 0:
            path, nonce = _SHM_DIR / f"tp-llama-{os.getpid()}-{secrets.token_hex(8)}", secrets.randbits(64)
            try:
                segment = _Segment(lib, _map(lib, path, size, create=True), rank, size, timeout_s)
                lib.shm_set_identity(segment.base, rank, os.getpid(), nonce)
                offer = [(str(path), nonce)]
            except OSError as e:  # full (a container's 64 MB /dev/shm), or not ours to write
                offer = [f"{_SHM_DIR} has no room for {lib.shm_segment_bytes(size, SLOT_BYTES)} bytes "
                         f"({e.strerror or e})"]
        dist.broadcast_object_list(offer, group=group, group_src=0)
        if isinstance(offer[0], str):
            return None, offer[0]
        path, nonce = Path(offer[0][0]), offer[0][1]
        if rank != 0:
            memory = _map(lib, path, size, create=False)
            segment = _Segment(lib, memory, rank, size, timeout_s) if memory else None
            # The same name may exist in another host's /dev/shm: the nonce tells.
            if segment is not None and lib.shm_nonce(segment.base) == nonce:
                lib.shm_set_identity(segment.base, rank, os.getpid(), 0)
            else:
                segment = None
        # Every rank must map it, then see every peer's process, or none uses it.
        if not _all_ranks(segment is not None, group):
            return None, "ranks on more than one host"
        if not _all_ranks(all(lib.shm_peer_alive(segment.base, r) for r in range(size)), group):
            return None, "ranks cannot see each other's processes"
        return segment, ""
    finally:
        if rank == 0 and path is not None:  # every rank has mapped it or given up (or the broadcast
            path.unlink(missing_ok=True)    # failed): it lives as long as their mappings do


def _local_obstacle(lib: ctypes.CDLL | None, size: int) -> str:
    """What keeps this rank from the shared-memory path, or ""."""
    if os.environ.get("TP_LLAMA_SHM") == "0":
        return "turned off by TP_LLAMA_SHM=0"
    # Launchers on several machines (torchrun --nnodes N): even if some ranks share a host,
    # the group as a whole does not. A job started otherwise is judged by the segment itself.
    if os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size())) != str(dist.get_world_size()):
        return "ranks under more than one launcher (--nnodes)"
    if lib is None:
        return "shm_collectives.c could not be compiled (no C compiler? set CC)"
    if not _SHM_DIR.is_dir():
        return f"no {_SHM_DIR}"
    return f"more than {_MAX_RANKS} ranks" if size > _MAX_RANKS else ""


def _map(lib: ctypes.CDLL, path: Path, size: int, create: bool) -> mmap.mmap | None:
    """Rank 0 creates the segment (raising OSError if it cannot have all of it); the others map
    it, or get None (another host's /dev/shm, or not theirs to open)."""
    nbytes = lib.shm_segment_bytes(size, SLOT_BYTES)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR if create else os.O_RDWR, 0o600)
    except OSError:
        if create:
            raise
        return None
    try:
        if create:
            # Its pages reserved now: a segment only truncated to size would SIGBUS the first
            # rank to write past what a small /dev/shm holds, instead of falling back to gloo.
            os.posix_fallocate(fd, 0, nbytes)
        elif os.fstat(fd).st_size < nbytes:
            return None
        return mmap.mmap(fd, nbytes)
    except OSError:
        if create:
            os.unlink(path)
            raise
        return None
    finally:
        os.close(fd)


def _all_ranks(flag: bool, group: dist.ProcessGroup) -> bool:
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def _timeout_s(group: dist.ProcessGroup) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


# Segments by handle: the ops below take an int, which a compiled graph keeps as a constant.
_SEGMENTS: list[_Segment] = []

# Operators for compiled graphs. Registered with torch.library.Library rather than the
# custom_op decorator: its dispatch costs about half as much per call (7 vs 13 us measured),
# and a compiled decode step makes one per collective. The group size is an argument of the
# all-gather so that it is part of the graph, whose output shape depends on it (inductor's
# on-disk cache would otherwise serve a graph built for another size).
_OPS = torch.library.Library("tp_llama", "FRAGMENT")
_OPS.define("shm_all_reduce(Tensor x, int handle) -> Tensor")
_OPS.define("shm_all_gather(Tensor x, int handle, int size) -> Tensor")
_OPS.impl("shm_all_reduce", lambda x, handle: _SEGMENTS[handle].all_reduce(x), "CPU")
_OPS.impl("shm_all_gather", lambda x, handle, size: _SEGMENTS[handle].all_gather(x), "CPU")


@torch.library.register_fake("tp_llama::shm_all_reduce")
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.register_fake("tp_llama::shm_all_gather")
def _(x: torch.Tensor, handle: int, size: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], size * x.shape[-1]))


class Collectives:
    """All-reduce (sum) and all-gather of one tensor-parallel group; `path` says which
    implementation serves them."""

    def __init__(self, group: dist.ProcessGroup, size: int, segment: _Segment | None, path: str) -> None:
        self.group, self.size, self.rank, self.path = group, size, group.rank(), path
        self._handle = None
        if segment is not None:
            self._handle = len(_SEGMENTS)
            _SEGMENTS.append(segment)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        if self._handle is not None and x.device.type == "cpu" and x.dtype in _DTYPE_CODES:
            if torch.compiler.is_compiling():
                return torch.ops.tp_llama.shm_all_reduce(x, self._handle)
            return _SEGMENTS[self._handle].all_reduce(x)  # eager: skip the dispatcher (~10 us a call)
        return funcol.all_reduce(x, "sum", self.group)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x concatenated along the last dimension, in rank order."""
        if self.size == 1:
            return x
        if self._handle is not None and x.device.type == "cpu":
            if torch.compiler.is_compiling():
                return torch.ops.tp_llama.shm_all_gather(x, self._handle, self.size)
            return _SEGMENTS[self._handle].all_gather(x)
        return funcol.all_gather_tensor(x.contiguous(), x.dim() - 1, self.group)


_BY_GROUP: dict[str, Collectives] = {}


def for_mesh(mesh: DeviceMesh) -> Collectives:
    """The collectives of a 1-D mesh's group, set up once per group (collective on first use)."""
    group = mesh.get_group()
    name = group.group_name
    if name not in _BY_GROUP:
        size = mesh.size()
        backend = dist.get_backend(group)
        if size == 1:
            collectives = Collectives(group, size, None, "none (1 rank)")
        elif mesh.device_type != "cpu":
            collectives = Collectives(group, size, None, f"torch.distributed ({backend})")
        else:
            segment, reason = _open_segment(group)
            path = "shared memory" if segment else f"torch.distributed ({backend}): {reason}"
            collectives = Collectives(group, size, segment, path)
        _BY_GROUP[name] = collectives
    return _BY_GROUP[name]
