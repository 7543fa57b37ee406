"""Shared test tools: tiny Meta-format checkpoints, real tokenizer files, torchrun launches."""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llama.args import ModelArgs
from llama.meta_format import save_meta_checkpoint

REPO = Path(__file__).resolve().parent.parent

# Tiny shapes in the two families' styles: Llama 2 (MHA, theta 1e4) and Llama 3.1 (GQA,
# theta 5e5, scaled rope, ffn_dim_multiplier).
LLAMA2_TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=32, norm_eps=1e-5,
                   rope_theta=10000.0, max_seq_len=128, max_batch_size=4)
LLAMA3_TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.3,
                   norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, max_seq_len=128, max_batch_size=4)


def package_file(package: str, relative: str) -> Path:
    """A data file shipped inside an installed package (see requirements-fixtures.txt)."""
    spec = importlib.util.find_spec(package)
    assert spec is not None, f"{package} is not installed: pip install --no-deps -r requirements-fixtures.txt"
    return Path(spec.origin).parent / relative


def llama3_tokenizer_path() -> Path:
    return package_file("llama_models", "llama3/tokenizer.model")


def sentencepiece_32k_path() -> Path:
    return package_file("mistral_common", "data/tokenizer.model.v1")


def random_weights(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full float32 weights with Meta names, scaled so logits are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in args.weight_shapes().items():
        if len(shape) == 1:
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            std = {"tok_embeddings.weight": 1.0, "output.weight": 4.0 / shape[-1] ** 0.5}.get(name, 0.5 / shape[-1] ** 0.5)
            state[name] = torch.randn(shape, generator=g) * std
    return state


def paged_logits(model, tokens: torch.Tensor, prefill: int, block_size: int = 4) -> torch.Tensor:
    """Logits (batch, length, vocab) of a prefill of each row's first `prefill` tokens (all rows in
    one forward), then one decode step per further token, through the paged KV cache; the rows'
    blocks are taken from the end of the pool backwards, so block tables must be followed."""
    from llama.model import PagedBatch

    bsz, length = tokens.shape
    width = -(-length // block_size)
    model.setup_kv_cache(bsz * width, block_size)
    tables = torch.arange(bsz * width).flip(0).view(bsz, width)

    def slots(positions: torch.Tensor) -> torch.Tensor:  # (batch, n) -> (batch * n,)
        return (tables.gather(1, positions // block_size) * block_size + positions % block_size).flatten()

    positions = torch.arange(prefill).expand(bsz, -1)
    batch = PagedBatch(positions.flatten(), slots(positions), tables, [prefill] * bsz, [prefill] * bsz)
    logits = [model.prefill(tokens[:, :prefill].flatten(), batch, torch.arange(bsz * prefill)).view(bsz, prefill, -1)]
    for i in range(prefill, length):
        positions = torch.full((bsz, 1), i)
        logits.append(model.decode(tokens[:, i], PagedBatch(positions.flatten(), slots(positions), tables))[:, None])
    return torch.cat(logits, dim=1)


def make_meta_checkpoint(out_dir: Path, tokenizer_path: Path, n_shards: int = 1, llama2_layout: bool = True,
                         tied_output: bool = False, seed: int = 0, **arch: object) -> ModelArgs:
    """A random tiny model written in Meta's format, with its tokenizer.model beside it."""
    from llama.tokenizer import Tokenizer

    args = ModelArgs(**(arch or LLAMA2_TINY), vocab_size=Tokenizer(tokenizer_path).n_words)
    state = random_weights(args, seed)
    if tied_output:
        state["output.weight"] = state["tok_embeddings.weight"]
    save_meta_checkpoint(state, args, out_dir, n_shards=n_shards, llama2_layout=llama2_layout,
                         tied_output=tied_output)
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
    return args


def torchrun_command(script: str, *args: object, nproc: int = 1, rdzv_port: int | None = None) -> list[str]:
    """torchrun running one of the project's scripts with `nproc` ranks: a job of its own, or
    with `rdzv_port` one of two launchers ("nodes") that meet at 127.0.0.1:rdzv_port."""
    launch = (["--standalone"] if rdzv_port is None else
              ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv_port}"])
    return [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc_per_node", str(nproc),
            str(REPO / script), *map(str, args)]


def script_env(gpu: bool = False, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launched script: CPU and gloo unless `gpu`, which leaves the GPUs
    visible (NCCL)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            **({} if gpu else {"CUDA_VISIBLE_DEVICES": ""}), **(env or {})}


def run_script(script: str, *args: object, nproc: int = 1, timeout: float = 300, gpu: bool = False,
               env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts under torchrun with `nproc` ranks (see script_env)."""
    return subprocess.run(torchrun_command(script, *args, nproc=nproc), capture_output=True, text=True,
                          timeout=timeout, env=script_env(gpu, env), cwd=REPO, input=input)


def convert(src: Path, out: Path, nproc: int = 1, *extra: object) -> subprocess.CompletedProcess:
    result = run_script("convert_checkpoints.py", "--original_ckpt_dir", src, "--save_checkpoint_dir", out,
                        "--dtype", "float32", *extra, nproc=nproc)
    assert result.returncode == 0, result.stderr
    return result


def generate_json(ckpt: Path, out_json: Path, *prompts: str, nproc: int = 1, extra: tuple = ()) -> dict:
    args = [a for p in prompts for a in ("--prompt", p)]
    result = run_script("generate.py", "--converted_ckpt_dir", ckpt, "--output_json", out_json, "--dtype", "float32",
                        "--temperature", "0", *args, *extra, nproc=nproc)
    assert result.returncode == 0, result.stderr
    return json.loads(out_json.read_text())


# --- launchers whose processes a test watches, kills and reads as they run -------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launchers:
    """Running torchrun launchers (one job of its own, or two nodes of one job) whose output
    is read as it comes; every process they started is killed when the test ends."""

    def __init__(self, script: str, *args: object, nodes: int = 1, nproc: int = 2, gpu: bool = False) -> None:
        port = free_port() if nodes == 2 else None
        self.procs = [subprocess.Popen(torchrun_command(script, *args, nproc=nproc, rdzv_port=port),
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       env=script_env(gpu), cwd=REPO) for _ in range(nodes)]
        self.out = [b""] * nodes
        self.err = [b""] * nodes
        self.started_workers: set[int] = set()

    def __enter__(self) -> Launchers:
        return self

    def __exit__(self, *exc: object) -> None:
        for pid in self.started_workers:  # workers run in sessions of their own: kill them one by one
            kill(pid)
        for proc in self.procs:
            proc.kill()
            proc.wait()

    def workers(self, count: int, timeout: float = 60) -> dict[int, int]:
        """rank -> pid of the `count` workers, once all have started."""
        deadline = time.monotonic() + timeout
        while True:
            found = {}
            for proc in self.procs:
                for pid in children(proc.pid):
                    rank = environ(pid).get("RANK")
                    if rank is not None:
                        found[int(rank)] = pid
            self.started_workers |= set(found.values())
            if len(found) == count:
                return found
            assert time.monotonic() < deadline, f"{len(found)} of {count} workers started"
            time.sleep(0.1)

    def read_until(self, node: int, done: Callable[[bytes], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        stream = self.procs[node].stdout
        while not done(self.out[node]):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"still waiting after {timeout}s: {self.out[node]!r}"
            if select.select([stream], [], [], remaining)[0]:
                chunk = os.read(stream.fileno(), 65536)
                assert chunk, f"output ended early: {self.out[node]!r} {self.procs[node].stderr.read()!r}"
                self.out[node] += chunk

    def wait(self, node: int, timeout: float) -> int:
        """The launcher's exit status, once it and every process writing to its output ended
        (stdin stays open: closing it would end an interactive session)."""
        proc = self.procs[node]
        proc.wait(timeout=timeout)
        self.out[node] += proc.stdout.read()
        self.err[node] += proc.stderr.read()
        return proc.returncode

    def error_lines(self, node: int | None = None) -> list[str]:
        """Our error lines (torchrun's own report of failed workers has none) of one launcher or all."""
        errs = self.err if node is None else [self.err[node]]
        return [line for err in errs for line in err.decode().splitlines() if line.startswith("error")]


def children(pid: int) -> list[int]:
    """The processes `pid` started (a launcher's workers)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
